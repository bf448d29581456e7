// Absorbed MLA attention for one query per row, reading the cached latents where the engine's paged store
// holds them: no gathered copy of the context, and each row's latents are read from memory once (the second
// pass finds them in cache). The reference is nanoseek.model.latent_attention over the gathered context.
//
// q [B, H, D] fp32 (each head's query in the latent space, scaled), data [N, D] (one layer's store),
// slots [B, T] (row b's context positions 0 .. lens[b] - 2 are data[slots[b, t]]; the rest is ignored),
// lens [B] (row b's context length, its last position being new[b]), new [B, D] -> [B, H, rank]: each head's
// softmax(q c^T)-weighted sum of the context latents' first `rank` dims.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

// 16 floats, loaded and stored unaligned; GCC and Clang lower it to the widest vectors the target has.
typedef float v16 __attribute__((vector_size(64), aligned(4)));
constexpr int64_t W = 16;
constexpr int HB = 4;  // heads per tile
constexpr int TB = 4;  // context rows per tile of the score pass

inline v16 load(const float* p) { return *reinterpret_cast<const v16*>(p); }

inline float sum(v16 v) {
  float s = 0.f;
  for (int i = 0; i < W; ++i) s += v[i];
  return s;
}

// p[i][t] = q_i . c_t for heads qs[0..HB) and rows c_t = rows[t], t < n (rows past n repeat the last one).
void scores(const float* const* qs, const float* const* rows, int64_t n, int64_t d, int hb, float* p,
            int64_t stride) {
  const int64_t dv = d - d % W;
  for (int64_t t0 = 0; t0 < n; t0 += TB) {
    v16 acc[HB][TB] = {};
    for (int64_t k = 0; k < dv; k += W) {
      v16 c[TB], x[HB];
      for (int j = 0; j < TB; ++j) c[j] = load(rows[t0 + j] + k);
      for (int i = 0; i < HB; ++i) x[i] = load(qs[i] + k);
      for (int i = 0; i < HB; ++i)
        for (int j = 0; j < TB; ++j) acc[i][j] += x[i] * c[j];
    }
    for (int i = 0; i < hb; ++i)
      for (int j = 0; j < TB && t0 + j < n; ++j) {
        float s = sum(acc[i][j]);
        for (int64_t k = dv; k < d; ++k) s += qs[i][k] * rows[t0 + j][k];
        p[i * stride + t0 + j] = s;
      }
  }
}

void softmax(float* p, int64_t n) {
  float m = -INFINITY, s = 0.f;
  for (int64_t t = 0; t < n; ++t) m = std::max(m, p[t]);
  for (int64_t t = 0; t < n; ++t) s += (p[t] = std::exp(p[t] - m));
  for (int64_t t = 0; t < n; ++t) p[t] /= s;
}

// out[i][k0 : k0 + V*W] = sum_t p[i][t] c_t[k0 : ...] for the heads i < hb.
template <int V>
void weighted_sum(const float* const* rows, int64_t n, const float* p, int64_t stride, int hb, int64_t k0,
                  float* out, int64_t out_stride) {
  v16 acc[HB][V] = {};
  for (int64_t t = 0; t < n; ++t) {
    v16 c[V];
    for (int v = 0; v < V; ++v) c[v] = load(rows[t] + k0 + v * W);
    for (int i = 0; i < HB; ++i) {
      const float w = p[std::min(i, hb - 1) * stride + t];
      for (int v = 0; v < V; ++v) acc[i][v] += w * c[v];
    }
  }
  for (int i = 0; i < hb; ++i)
    for (int v = 0; v < V; ++v) *reinterpret_cast<v16*>(out + i * out_stride + k0 + v * W) = acc[i][v];
}

at::Tensor paged_latent_attention(const at::Tensor& q, const at::Tensor& data, const at::Tensor& slots,
                                  const at::Tensor& lens, const at::Tensor& new_latents, int64_t rank) {
  TORCH_CHECK(q.device().is_cpu() && q.scalar_type() == at::kFloat && data.scalar_type() == at::kFloat &&
                  new_latents.scalar_type() == at::kFloat,
              "paged_latent_attention: fp32 CPU tensors only");
  TORCH_CHECK(slots.scalar_type() == at::kLong && lens.scalar_type() == at::kLong,
              "paged_latent_attention: slots and lens must be int64");
  const int64_t b = q.size(0), h = q.size(1), d = q.size(2), t_max = slots.size(1);
  TORCH_CHECK(data.size(1) == d && new_latents.size(1) == d && rank <= d, "paged_latent_attention: widths");
  const auto qc = q.contiguous(), dc = data.contiguous(), sc = slots.contiguous(), lc = lens.contiguous(),
             nc = new_latents.contiguous();
  auto out = at::empty({b, h, rank}, q.options());
  const float *qp = qc.data_ptr<float>(), *dp = dc.data_ptr<float>(), *np = nc.data_ptr<float>();
  const int64_t *sp = sc.data_ptr<int64_t>(), *lp = lc.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, b, 1, [&](int64_t r0, int64_t r1) {
    std::vector<float> p(h * t_max);
    std::vector<const float*> rows(t_max + TB);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = lp[r];
      TORCH_CHECK(n >= 1 && n <= t_max, "paged_latent_attention: a length outside [1, T]");
      for (int64_t t = 0; t + 1 < n; ++t) rows[t] = dp + sp[r * t_max + t] * d;
      for (int64_t t = n - 1; t < n + TB; ++t) rows[t] = np + r * d;
      const float* qr = qp + r * h * d;
      float* o = op + r * h * rank;
      for (int64_t h0 = 0; h0 < h; h0 += HB) {
        const int hb = static_cast<int>(std::min<int64_t>(HB, h - h0));
        const float* qs[HB];
        for (int i = 0; i < HB; ++i) qs[i] = qr + (h0 + std::min(i, hb - 1)) * d;
        float* ph = p.data() + h0 * t_max;
        scores(qs, rows.data(), n, d, hb, ph, t_max);
        for (int i = 0; i < hb; ++i) softmax(ph + i * t_max, n);
        int64_t k = 0;
        for (; k + 4 * W <= rank; k += 4 * W) weighted_sum<4>(rows.data(), n, ph, t_max, hb, k, o + h0 * rank, rank);
        for (; k + W <= rank; k += W) weighted_sum<1>(rows.data(), n, ph, t_max, hb, k, o + h0 * rank, rank);
        for (; k < rank; ++k)
          for (int i = 0; i < hb; ++i) {
            float s = 0.f;
            for (int64_t t = 0; t < n; ++t) s += ph[i * t_max + t] * rows[t][k];
            o[(h0 + i) * rank + k] = s;
          }
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(nanoseek, m) {
  m.def("paged_latent_attention(Tensor q, Tensor data, Tensor slots, Tensor lens, Tensor new, int rank) -> Tensor");
}

TORCH_LIBRARY_IMPL(nanoseek, CPU, m) { m.impl("paged_latent_attention", &paged_latent_attention); }
