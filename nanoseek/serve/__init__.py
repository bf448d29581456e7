"""`nanoseek serve`: the OpenAI/DeepSeek-compatible API and the chat page, over one shared engine."""
