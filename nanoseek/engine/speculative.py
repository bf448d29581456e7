"""MTP speculative decoding (V3 report §2.2, "MTP in inference"): the MTP module drafts the token after
next, and the next step's forward verifies it alongside the token it follows, so an accepted draft emits two
tokens a step."""

from __future__ import annotations

from torch import Tensor

from .runner import ModelRunner, StepOutput, StepRows
from .sampling import Sample, apply_penalties, draw, processed_probs, sample, verify_draft
from .scheduler import Sequence


class Speculator:
    """Drafts with the model's MTP module and verifies drafts against the main model's logits; `stats`
    counts drafts made and accepted."""

    def __init__(self, runner: ModelRunner):
        self.runner = runner
        self.stats = {"drafted": 0, "accepted": 0}

    def verify(self, seq: Sequence, logits: Tensor) -> list[Sample]:
        """The tokens a step emits for seq, from the logits [drafts + 1, V] at its drafts' positions and the
        last: each draft accepted or replaced (`verify_draft`) up to the first one replaced; after all were
        accepted, one token more, sampled."""
        emitted: list[Sample] = []
        for j, d in enumerate(seq.draft):
            s, ok = verify_draft(
                logits[j],
                d,
                seq.draft_probs,
                seq.params,
                seq.output_ids + [x.token for x in emitted],
                seq.generator,
            )
            emitted.append(s)
            self.stats["drafted"] += 1
            self.stats["accepted"] += ok
            if not ok:
                return emitted
        so_far = seq.output_ids + [x.token for x in emitted]
        return emitted + [sample(logits[-1], seq.params, so_far, seq.generator)]

    def draft(self, rows: StepRows, out: StepOutput) -> None:
        """Draft the token after next for every sequence of the step that got its next one; the MTP layer
        fills its cache at the positions the main forward computed, from (h_i, token_{i+1}).

        It reuses the main forward's batch view: a position past a rejected draft (or past the end) gets
        a placeholder next token, and its slot is rewritten next step, as the main layers' slots are."""
        drafting = self._drafting(rows)
        if out.drafts is not None:  # greedy rows drafted inside the verifying forward
            for i, pos, seq in drafting:
                seq.draft, seq.draft_probs = [int(out.drafts[i, pos])], None
            return
        s = max(rows.lens)
        # each position's next token (the drafts just verified are spent: past the end, a placeholder)
        nexts = [
            (seq.window(st + 1, s) + [0] * s)[:s] for seq, st in zip(rows.seqs, rows.starts, strict=True)
        ]
        logits = self.runner.draft_logits(rows, out, nexts, [(i, p) for i, p, _ in drafting])
        if logits is None:
            return
        for (_, _, seq), lg in zip(drafting, logits, strict=True):
            lg = apply_penalties(lg, seq.output_ids, seq.params)
            if seq.params.greedy:
                seq.draft, seq.draft_probs = [int(lg.argmax())], None
            else:
                seq.draft_probs = processed_probs(lg, seq.params)
                seq.draft = [draw(seq.draft_probs, seq.generator)]

    @staticmethod
    def _drafting(rows: StepRows) -> list[tuple[int, int, Sequence]]:
        """(row, position in the forward, sequence) of those to draft for after a forward, the position being
        the last computed one, which a draft follows: nothing while prefilling or finished, before the first
        token (sampled plainly, whatever the chunking), or where a draft survived preemption (verified as it
        was, for seeded sampling)."""
        return [
            (i, seq.num_computed - 1 - st, seq)
            for i, (seq, st) in enumerate(zip(rows.seqs, rows.starts, strict=True))
            if not seq.finished
            and seq.num_computed == seq.num_tokens - 1
            and seq.output_ids
            and not seq.draft
        ]
