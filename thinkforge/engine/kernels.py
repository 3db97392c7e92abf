"""Matrix-vector products for the fast CPU decode step at a few rows: float32 weights streamed once at the memory's
rate, with the step's norms and epilogues fused (an RMS norm before, a bias, the residual add, SiLU(gate) x up after).

Why (dev/LOG.md 2026-12-08): at one row a decode step reads every weight once, so its time is the weights' bytes over
the read bandwidth. oneDNN's products over its packed layout read SmolLM2's 538 MB at 15-19 GB/s on a 2-core AVX2
EPYC whose plain read (`x.sum()`) runs at 26; these loops run at 26, the bound. At 32 rows the products are
arithmetic-bound and oneDNN's blocked kernels win, so the fast step keeps them there (`ROWS`).

The kernels are C++ built once per machine with torch's extension builder (a C++ compiler and ninja; ~20-40 s, kept
in torch's extensions folder, `TORCH_EXTENSIONS_DIR`) and registered as `torch.ops.thinkforge_cpu.*`. Where they
cannot build (no compiler, another platform's toolchain), `ops()` says why once and the fast step keeps oneDNN.
`THINKFORGE_CPU_KERNELS=0` turns them off (the benchmarks' A/B). The loops are GCC/Clang vector extensions, 8 floats
wide: AVX2 + FMA where torch's own CPU capability is AVX2 or AVX-512, NEON on Arm, SSE2 elsewhere; Linux only (threaded by OpenMP, as torch is there).

Each output is one row's dot product with the input, summed in 8 lanes then across them: a different order from
oneDNN's, so results agree to float32 rounding (tests/test_fast_step.py compares both with transformers' forward).
"""

from __future__ import annotations

import os
import platform
import warnings

# A decode that starts with at most this many rows runs these kernels (over weights in their plain layout); more rows
# run oneDNN's blocked products. Measured in benchmarks/gemv.py (BENCHMARKS.md): at 1-4 rows these read the weights at
# the memory's rate and oneDNN does not; from ~8 rows oneDNN's blocked products are faster.
ROWS = 8

SOURCE = r"""
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>
#include <cmath>
#include <cstring>
#include <optional>
#include <vector>

namespace {

typedef float v8 __attribute__((vector_size(32)));

inline v8 load8(const float* p) { v8 v; std::memcpy(&v, p, sizeof v); return v; }

inline float sum8(v8 v) { return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7])); }

// out[c * R + r] = dot(w row r, x row c) for the R consecutive rows of w (K wide) starting at w and the C rows of x
// (K wide) starting at x: R x C x U sums in registers (U = 4 / R independent sums per pair, for the loads in flight),
// each weight load used C times.
template <int R, int C>
inline void dots(const float* w, int64_t K, const float* x, float* out) {
  constexpr int U = R >= 4 ? 1 : 4 / R;
  v8 acc[C][R][U];
  for (int c = 0; c < C; ++c)
    for (int r = 0; r < R; ++r)
      for (int u = 0; u < U; ++u) acc[c][r][u] = v8{};
  int64_t k = 0;
  for (; k + 8 * U <= K; k += 8 * U) {
    v8 wv[R][U];
    for (int r = 0; r < R; ++r)
      for (int u = 0; u < U; ++u) wv[r][u] = load8(w + r * K + k + 8 * u);
    for (int c = 0; c < C; ++c)
      for (int u = 0; u < U; ++u) {
        const v8 xv = load8(x + c * K + k + 8 * u);
        for (int r = 0; r < R; ++r) acc[c][r][u] += wv[r][u] * xv;
      }
  }
  for (; k + 8 <= K; k += 8)
    for (int c = 0; c < C; ++c) {
      const v8 xv = load8(x + c * K + k);
      for (int r = 0; r < R; ++r) acc[c][r][0] += load8(w + r * K + k) * xv;
    }
  for (int c = 0; c < C; ++c)
    for (int r = 0; r < R; ++r) {
      v8 total = acc[c][r][0];
      for (int u = 1; u < U; ++u) total += acc[c][r][u];
      float s = sum8(total);
      for (int64_t j = k; j < K; ++j) s += w[r * K + j] * x[c * K + j];
      out[c * R + r] = s;
    }
}

// dots<R, C> over all B rows of x: pairs of rows, then the last one alone; out is (B, R).
template <int R>
inline void dots_rows(const float* w, int64_t K, const float* x, int64_t B, float* out) {
  int64_t b = 0;
  for (; b + 2 <= B; b += 2) dots<R, 2>(w, K, x + b * K, out + b * R);
  if (b < B) dots<R, 1>(w, K, x + b * K, out + b * R);
}

void check(const at::Tensor& t, const char* what, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() && t.dim() == dim,
              "thinkforge_cpu: ", what, " must be a contiguous float32 CPU tensor of ", dim, " dims");
}

// The rows the products read: x itself, or (norm given) x's RMS norm times `norm`, as transformers' LlamaRMSNorm:
// (x * rsqrt(mean(x^2) + eps)) * norm, the mean summed in double, into buf.
const float* normed(const at::Tensor& x, const std::optional<at::Tensor>& norm, double eps, std::vector<float>& buf) {
  const float* X = x.data_ptr<float>();
  if (!norm.has_value()) return X;
  check(*norm, "norm", 1);
  const int64_t B = x.size(0), K = x.size(1);
  TORCH_CHECK(norm->size(0) == K, "thinkforge_cpu: norm is ", norm->size(0), " wide, x ", K);
  const float* nw = norm->data_ptr<float>();
  buf.resize(B * K);
  for (int64_t b = 0; b < B; ++b) {
    double ss = 0.0;
    for (int64_t k = 0; k < K; ++k) ss += double(X[b * K + k]) * X[b * K + k];
    const float inv = float(1.0 / std::sqrt(ss / double(K) + eps));
    for (int64_t k = 0; k < K; ++k) buf[b * K + k] = (X[b * K + k] * inv) * nw[k];
  }
  return buf.data();
}

constexpr int64_t BLOCK = 4;   // weight rows read together, kept in L1 across the input rows (1 row with 4 sums in
                               // flight: no faster at one input row, slower at several; dev/LOG.md 2026-12-08)
constexpr int64_t GRAIN = 8;   // blocks a thread takes at least

// [rms_norm(]x (B, K)[, norm, eps)] @ w (N, K).T [+ bias (N)] [+ residual (B, N)] -> (B, N)
at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                  const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& norm, double eps) {
  check(x, "x", 2);
  check(w, "w", 2);
  const int64_t B = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(w.size(1) == K, "thinkforge_cpu.linear: x is ", K, " wide, w ", w.size(1));
  const float* bp = nullptr;
  const float* rp = nullptr;
  if (bias.has_value()) { check(*bias, "bias", 1); TORCH_CHECK(bias->size(0) == N, "bias size"); bp = bias->data_ptr<float>(); }
  if (residual.has_value()) {
    check(*residual, "residual", 2);
    TORCH_CHECK(residual->size(0) == B && residual->size(1) == N, "residual shape");
    rp = residual->data_ptr<float>();
  }
  at::Tensor y = at::empty({B, N}, x.options());
  std::vector<float> buf;
  const float* X = normed(x, norm, eps, buf);
  const float* W = w.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  const int64_t blocks = (N + BLOCK - 1) / BLOCK;
  at::parallel_for(0, blocks, GRAIN, [&](int64_t s, int64_t e) {
    std::vector<float> out(B * BLOCK);
    for (int64_t blk = s; blk < e; ++blk) {
      const int64_t n0 = blk * BLOCK, rows = std::min(BLOCK, N - n0);
      if (rows == BLOCK) dots_rows<BLOCK>(W + n0 * K, K, X, B, out.data());
      for (int64_t r = 0; r < rows; ++r) {
        if (rows < BLOCK) {  // the last rows of w, one at a time: out[b * BLOCK + r]
          std::vector<float> one(B);
          dots_rows<1>(W + (n0 + r) * K, K, X, B, one.data());
          for (int64_t b = 0; b < B; ++b) out[b * BLOCK + r] = one[b];
        }
        for (int64_t b = 0; b < B; ++b) {
          float v = out[b * BLOCK + r];
          if (bp) v += bp[n0 + r];
          if (rp) v = rp[b * N + n0 + r] + v;
          Y[b * N + n0 + r] = v;
        }
      }
    }
  });
  return y;
}

// silu(x @ w[:I].T) * (x @ w[I:].T) for w (2I, K): a Llama MLP's gate and up products stacked -> (B, I); x RMS-normed
// first where norm is given, as in linear
at::Tensor gated_silu(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& norm, double eps) {
  check(x, "x", 2);
  check(w, "w", 2);
  const int64_t B = x.size(0), K = x.size(1), I = w.size(0) / 2;
  TORCH_CHECK(w.size(1) == K && w.size(0) == 2 * I, "thinkforge_cpu.gated_silu: w must be (2I, K) for x (B, K)");
  at::Tensor y = at::empty({B, I}, x.options());
  std::vector<float> buf;
  const float* X = normed(x, norm, eps, buf);
  const float* W = w.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  const int64_t blocks = (I + BLOCK - 1) / BLOCK;
  at::parallel_for(0, blocks, GRAIN, [&](int64_t s, int64_t e) {
    std::vector<float> g(B * BLOCK), u(B * BLOCK);
    for (int64_t blk = s; blk < e; ++blk) {
      const int64_t n0 = blk * BLOCK, rows = std::min(BLOCK, I - n0);
      if (rows == BLOCK) {
        dots_rows<BLOCK>(W + n0 * K, K, X, B, g.data());
        dots_rows<BLOCK>(W + (I + n0) * K, K, X, B, u.data());
      }
      for (int64_t r = 0; r < rows; ++r) {
        if (rows < BLOCK) {
          std::vector<float> g1(B), u1(B);
          dots_rows<1>(W + (n0 + r) * K, K, X, B, g1.data());
          dots_rows<1>(W + (I + n0 + r) * K, K, X, B, u1.data());
          for (int64_t b = 0; b < B; ++b) g[b * BLOCK + r] = g1[b], u[b * BLOCK + r] = u1[b];
        }
        for (int64_t b = 0; b < B; ++b) {
          const float gv = g[b * BLOCK + r];
          Y[b * I + n0 + r] = gv / (1.0f + std::exp(-gv)) * u[b * BLOCK + r];
        }
      }
    }
  });
  return y;
}

constexpr int64_t LANES = 32;  // head widths up to 256 sum their values in registers

inline float dot(const float* a, const float* b, int64_t n) {
  v8 acc = v8{};
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) acc += load8(a + k) * load8(b + k);
  float s = sum8(acc);
  for (; k < n; ++k) s += a[k] * b[k];
  return s;
}

// One decode step's attention for B rows of a fused q/k/v product (B, (heads + 2 kv_heads) d): q and k rotated by
// (cos, sin) (B, rotated) as transformers' rotate_half does on each head's first `rotated` dims (the rest pass); the
// new key and value written at position `at` of the reserved cache (B, kv_heads, capacity, d); query head i attends
// kv head i / (heads / kv_heads) over positions 0..at where keys (B, at + 1) is true (all where absent), softmax in
// float -> (B, heads d).
at::Tensor attend(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, at::Tensor k_buf, at::Tensor v_buf,
                  int64_t at_, const std::optional<at::Tensor>& keys, int64_t heads, int64_t kv_heads, double scale) {
  check(qkv, "qkv", 2);
  check(cos, "cos", 2);
  check(sin, "sin", 2);
  check(k_buf, "k_buf", 4);
  check(v_buf, "v_buf", 4);
  const int64_t B = qkv.size(0), d = k_buf.size(3), cap = k_buf.size(2), rotated = cos.size(1), half = rotated / 2;
  TORCH_CHECK(qkv.size(1) == (heads + 2 * kv_heads) * d && heads % kv_heads == 0, "thinkforge_cpu.attend: qkv shape");
  TORCH_CHECK(k_buf.size(0) == B && k_buf.size(1) == kv_heads && v_buf.sizes() == k_buf.sizes(), "attend: cache shape");
  TORCH_CHECK(cos.size(0) == B && sin.sizes() == cos.sizes() && rotated <= d && rotated % 2 == 0, "attend: cos/sin shape");
  TORCH_CHECK(at_ >= 0 && at_ < cap, "thinkforge_cpu.attend: position ", at_, " outside a cache of ", cap);
  const int64_t T = at_ + 1, group = heads / kv_heads;
  const bool* mask = nullptr;
  if (keys.has_value()) {
    TORCH_CHECK(keys->scalar_type() == at::kBool && keys->is_contiguous() && keys->dim() == 2 && keys->size(0) == B &&
                keys->size(1) == T, "thinkforge_cpu.attend: keys must be a contiguous bool (B, at + 1)");
    mask = keys->data_ptr<bool>();
  }
  const float* QKV = qkv.data_ptr<float>();
  const float* C = cos.data_ptr<float>();
  const float* S = sin.data_ptr<float>();
  float* K = k_buf.data_ptr<float>();
  float* V = v_buf.data_ptr<float>();
  at::Tensor out = at::empty({B, heads * d}, qkv.options());
  float* O = out.data_ptr<float>();
  auto rotate = [&](const float* x, const float* c, const float* s, float* y) {
    for (int64_t i = 0; i < half; ++i) {
      y[i] = x[i] * c[i] - x[i + half] * s[i];
      y[i + half] = x[i + half] * c[i + half] + x[i] * s[i + half];
    }
    for (int64_t j = rotated; j < d; ++j) y[j] = x[j];
  };
  const int64_t width = (heads + 2 * kv_heads) * d;
  for (int64_t b = 0; b < B; ++b)  // the new keys (rotated) and values into the cache
    for (int64_t g = 0; g < kv_heads; ++g) {
      const float* x = QKV + b * width + (heads + g) * d;
      rotate(x, C + b * rotated, S + b * rotated, K + ((b * kv_heads + g) * cap + at_) * d);
      std::memcpy(V + ((b * kv_heads + g) * cap + at_) * d, x + kv_heads * d, d * sizeof(float));
    }
  const int64_t grain = T * d >= 4096 ? 1 : B * heads;  // short contexts: one thread (waking the other costs more)
  at::parallel_for(0, B * heads, grain, [&](int64_t s0, int64_t e0) {
    std::vector<float> q(d), p(T), acc(d);
    for (int64_t bh = s0; bh < e0; ++bh) {
      const int64_t b = bh / heads, h = bh % heads, g = h / group;
      rotate(QKV + b * width + h * d, C + b * rotated, S + b * rotated, q.data());
      const float* Kh = K + (b * kv_heads + g) * cap * d;
      const float* Vh = V + (b * kv_heads + g) * cap * d;
      float top = -INFINITY;
      for (int64_t t = 0; t < T; ++t) {
        p[t] = (mask && !mask[b * T + t]) ? -INFINITY : dot(q.data(), Kh + t * d, d) * float(scale);
        top = std::max(top, p[t]);
      }
      float total = 0.f;
      for (int64_t t = 0; t < T; ++t) { p[t] = p[t] == -INFINITY ? 0.f : std::exp(p[t] - top); total += p[t]; }
      float* o = O + b * heads * d + h * d;
      if (d % 8 == 0 && d <= 8 * LANES) {  // the weighted sum of values in registers, 8 lanes at a time
        v8 accv[LANES];
        for (int64_t j = 0; j < d / 8; ++j) accv[j] = v8{};
        for (int64_t t = 0; t < T; ++t) {
          if (p[t] == 0.f) continue;
          const float* v = Vh + t * d;
          for (int64_t j = 0; j < d / 8; ++j) accv[j] += p[t] * load8(v + 8 * j);
        }
        for (int64_t j = 0; j < d / 8; ++j) std::memcpy(acc.data() + 8 * j, &accv[j], sizeof(v8));
      } else {
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t t = 0; t < T; ++t) {
          if (p[t] == 0.f) continue;
          const float* v = Vh + t * d;
          for (int64_t j = 0; j < d; ++j) acc[j] += p[t] * v[j];
        }
      }
      for (int64_t j = 0; j < d; ++j) o[j] = acc[j] / total;
    }
  });
  return out;
}

// A Llama step's layers in one call (no Python between the products): for each layer l,
//   h = h + o_l(attend(qkv_l(rms(h) n1_l)));  h = h + down_l(silu(gate) x up of gate_up_l(rms(h) n2_l))
// every layer's cache at the same position `at`; a gate/up bias is not taken (the caller runs the ops one by one).
at::Tensor llama_layers(const at::Tensor& h0, at::TensorList norm1, at::TensorList qkv, const c10::List<std::optional<at::Tensor>>& qkv_bias,
                        at::TensorList o, const c10::List<std::optional<at::Tensor>>& o_bias, at::TensorList norm2, at::TensorList gate_up,
                        at::TensorList down, const c10::List<std::optional<at::Tensor>>& down_bias, const at::Tensor& cos,
                        const at::Tensor& sin, at::TensorList k_bufs, at::TensorList v_bufs, int64_t at_,
                        const std::optional<at::Tensor>& keys, int64_t heads, int64_t kv_heads, double scale, double eps) {
  const size_t L = qkv.size();
  TORCH_CHECK(norm1.size() == L && qkv_bias.size() == L && o.size() == L && o_bias.size() == L && norm2.size() == L &&
              gate_up.size() == L && down.size() == L && down_bias.size() == L && k_bufs.size() == L && v_bufs.size() == L,
              "thinkforge_cpu.llama_layers: every list must have one entry per layer");
  at::Tensor h = h0;
  for (size_t l = 0; l < L; ++l) {
    const at::Tensor mixed = linear(h, qkv[l], qkv_bias.get(l), std::nullopt, norm1[l], eps);
    const at::Tensor attended = attend(mixed, cos, sin, k_bufs[l], v_bufs[l], at_, keys, heads, kv_heads, scale);
    h = linear(attended, o[l], o_bias.get(l), h, std::nullopt, eps);
    h = linear(gated_silu(h, gate_up[l], norm2[l], eps), down[l], down_bias.get(l), h, std::nullopt, eps);
  }
  return h;
}

}  // namespace

TORCH_LIBRARY(thinkforge_cpu, m) {
  m.def("linear(Tensor x, Tensor w, Tensor? bias, Tensor? residual, Tensor? norm, float eps) -> Tensor");
  m.def("gated_silu(Tensor x, Tensor w, Tensor? norm, float eps) -> Tensor");
  m.def("attend(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) k_buf, Tensor(b!) v_buf, int at, Tensor? keys, "
        "int heads, int kv_heads, float scale) -> Tensor");
  m.def("llama_layers(Tensor h, Tensor[] norm1, Tensor[] qkv, Tensor?[] qkv_bias, Tensor[] o, Tensor?[] o_bias, "
        "Tensor[] norm2, Tensor[] gate_up, Tensor[] down, Tensor?[] down_bias, Tensor cos, Tensor sin, "
        "Tensor(a!)[] k_bufs, Tensor(b!)[] v_bufs, int at, Tensor? keys, int heads, int kv_heads, float scale, "
        "float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(thinkforge_cpu, CPU, m) {
  m.impl("linear", &linear);
  m.impl("gated_silu", &gated_silu);
  m.impl("attend", &attend);
  m.impl("llama_layers", &llama_layers);
}
"""

_STATE: dict = {}  # "ops": torch.ops.thinkforge_cpu once built, or "why": the reason it is not


def _flags() -> list[str]:
    """Compiler flags for this CPU: OpenMP (torch's `at::parallel_for` threads by it: the process's one OpenMP
    runtime, torch's own libgomp, serves both); AVX2 + FMA where torch itself runs AVX2 or AVX-512 kernels."""
    import torch

    flags = ["-O3", "-ffp-contract=fast", "-fopenmp"]
    if platform.machine().lower() in ("x86_64", "amd64") and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma"]
    return flags


def ops():
    """`torch.ops.thinkforge_cpu` (`linear`, `gated_silu`), built on first use, or None: turned off
    (`THINKFORGE_CPU_KERNELS=0`) or not buildable here, which is told once a process with the reason."""
    if "ops" in _STATE or "why" in _STATE:
        return _STATE.get("ops")
    if os.environ.get("THINKFORGE_CPU_KERNELS", "1").strip().lower() in ("0", "false", "no", "off"):
        _STATE["why"] = "THINKFORGE_CPU_KERNELS=0"
        return None
    if platform.system() != "Linux":  # torch's threads there are OpenMP's, which these are built against
        _STATE["why"] = f"the CPU kernels are built on Linux only, not {platform.system()}"
        return None
    import torch

    try:
        from torch.utils.cpp_extension import load_inline

        # One build per CPU capability: a folder shared by machines of two kinds never runs the other's code.
        load_inline(f"thinkforge_cpu_{torch.backends.cpu.get_cpu_capability().lower()}", [SOURCE],
                    extra_cflags=_flags(), extra_ldflags=["-fopenmp"], is_python_module=False, no_implicit_headers=True, verbose=False)
        _STATE["ops"] = torch.ops.thinkforge_cpu
    except Exception as e:  # no compiler or ninja, an unsupported toolchain: oneDNN's products stay
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        _STATE["why"] = f"the CPU kernels did not build ({first[:200]})"
        warnings.warn(f"thinkforge: one-row decode keeps oneDNN's products: {_STATE['why']}", stacklevel=2)
    return _STATE.get("ops")


def why_not() -> str | None:
    """Why `ops()` gave None (after it was called), else None."""
    return _STATE.get("why")
