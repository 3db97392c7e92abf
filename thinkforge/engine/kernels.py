"""The fast CPU decode step's arithmetic at a few rows, in C++: float32 matrix-vector products that stream the weights
once at the memory's rate, with the step's norms and epilogues fused (an RMS norm before; a bias, the residual add,
SiLU(gate) x up after), the step's attention in one op, and a Llama step's layers in one call.

Why (dev/LOG.md 2026-12-08): at one row a decode step reads every weight once, so its time is the weights' bytes over
the read bandwidth. On a 2-core AVX2 EPYC oneDNN's products over its packed layout read SmolLM2's 538 MB at 15-21 GB/s
where a plain read (`sum()`) runs at 24-31; these loops run at 75-95% of the plain read (benchmarks/gemv.py). Past
~8 rows the products are arithmetic-bound and oneDNN's blocked kernels win, so the fast step keeps them there (`ROWS`).
The weights are read where they are: q, k, v (and gate, up) as separate parts of one product, no stacked copy.

Built once per machine with torch's extension builder (a C++ compiler and ninja, a dependency; ~10 s, a line on a
terminal's stderr says so), kept in torch's extensions folder (`TORCH_EXTENSIONS_DIR`) under a name that carries a hash of the
source, and registered as `torch.ops.thinkforge_cpu.*`. Where they cannot run (`ops()`: not Linux, no AVX2 or NEON,
no compiler) the fast step keeps oneDNN; a failed build is warned once a process. `THINKFORGE_CPU_KERNELS=0` turns them off
(read once a process). The loops are GCC/Clang vector extensions, 8 floats wide: AVX2 + FMA on x86, NEON on Arm;
threaded by ATen's `parallel_for` (OpenMP: torch's own libgomp serves both).

Each output is one row's dot product with the input, summed in 8 lanes then across them: a different order from
oneDNN's, so results agree to float32 rounding (tests/test_kernels.py against torch; tests/test_fast_step.py runs
both layouts against transformers' forward to 1e-5).
"""

from __future__ import annotations

import os
import platform
import warnings

# A float32 decode that starts with at most this many rows runs these kernels (over weights in their plain layout);
# more rows run oneDNN's blocked products. Measured (BENCHMARKS.md): the products alone (benchmarks/gemv.py) 1.1-1.2x
# oneDNN's at 1-4 rows, even at 8, 0.85-0.94x at 16-32; the decode step (fusions included) 1.2-1.5x at 1-8 rows,
# about even at 16.
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

// One weight row block of a product: BLOCK (or fewer, at a part's end) rows of one part, at output column n0.
struct Block { const float* w; int64_t n0, rows; };

// The blocks of the parts stacked by rows (q, k, v read where they are, not copied into one matrix).
std::vector<Block> blocks_of(at::TensorList parts, int64_t K, int64_t& N) {
  std::vector<Block> blocks;
  N = 0;
  for (const at::Tensor& w : parts) {
    check(w, "w", 2);
    TORCH_CHECK(w.size(1) == K, "thinkforge_cpu.linear: x is ", K, " wide, w ", w.size(1));
    const float* W = w.data_ptr<float>();
    for (int64_t r = 0; r < w.size(0); r += BLOCK) blocks.push_back({W + r * K, N + r, std::min(BLOCK, w.size(0) - r)});
    N += w.size(0);
  }
  return blocks;
}

// out (B, BLOCK): the block's rows against every row of X
inline void block_dots(const Block& blk, int64_t K, const float* X, int64_t B, float* out, std::vector<float>& one) {
  if (blk.rows == BLOCK) {
    dots_rows<BLOCK>(blk.w, K, X, B, out);
    return;
  }
  one.resize(B);
  for (int64_t r = 0; r < blk.rows; ++r) {  // a part's last rows, one at a time
    dots_rows<1>(blk.w + r * K, K, X, B, one.data());
    for (int64_t b = 0; b < B; ++b) out[b * BLOCK + r] = one[b];
  }
}

// [rms_norm(]x (B, K)[, norm, eps)] @ cat(parts).T [+ bias (N)] [+ residual (B, N)] -> (B, N), parts (N_i, K)
// stacked by rows
at::Tensor linear(const at::Tensor& x, at::TensorList parts, const std::optional<at::Tensor>& bias,
                  const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& norm, double eps) {
  check(x, "x", 2);
  const int64_t B = x.size(0), K = x.size(1);
  int64_t N = 0;
  const std::vector<Block> blocks = blocks_of(parts, K, N);
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
  float* Y = y.data_ptr<float>();
  at::parallel_for(0, int64_t(blocks.size()), GRAIN, [&](int64_t s, int64_t e) {
    std::vector<float> out(B * BLOCK), one;
    for (int64_t i = s; i < e; ++i) {
      const Block& blk = blocks[i];
      block_dots(blk, K, X, B, out.data(), one);
      for (int64_t r = 0; r < blk.rows; ++r) {
        const int64_t n = blk.n0 + r;
        for (int64_t b = 0; b < B; ++b) {
          float v = out[b * BLOCK + r];
          if (bp) v += bp[n];
          if (rp) v = rp[b * N + n] + v;
          Y[b * N + n] = v;
        }
      }
    }
  });
  return y;
}

// silu(x @ gate.T) * (x @ up.T) for gate and up (I, K): a Llama MLP's -> (B, I); x RMS-normed first where norm is
// given, as in linear
at::Tensor gated_silu(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& up,
                      const std::optional<at::Tensor>& norm, double eps) {
  check(x, "x", 2);
  const int64_t B = x.size(0), K = x.size(1);
  int64_t I = 0, I2 = 0;
  const std::vector<Block> gates = blocks_of({gate}, K, I), ups = blocks_of({up}, K, I2);
  TORCH_CHECK(I == I2, "thinkforge_cpu.gated_silu: gate has ", I, " rows, up ", I2);
  at::Tensor y = at::empty({B, I}, x.options());
  std::vector<float> buf;
  const float* X = normed(x, norm, eps, buf);
  float* Y = y.data_ptr<float>();
  at::parallel_for(0, int64_t(gates.size()), GRAIN, [&](int64_t s, int64_t e) {
    std::vector<float> g(B * BLOCK), u(B * BLOCK), one;
    for (int64_t i = s; i < e; ++i) {
      block_dots(gates[i], K, X, B, g.data(), one);
      block_dots(ups[i], K, X, B, u.data(), one);
      for (int64_t r = 0; r < gates[i].rows; ++r)
        for (int64_t b = 0; b < B; ++b) {
          const float gv = g[b * BLOCK + r];
          Y[b * I + gates[i].n0 + r] = gv / (1.0f + std::exp(-gv)) * u[b * BLOCK + r];
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
//   h = h + o_l(attend(qkv_l(rms(h) n1_l)));  h = h + down_l(silu(gate_l(rms(h) n2_l)) x up_l(...))
// qkv: `parts` tensors a layer (q, k, v; or one fused), stacked by rows; every layer's cache at position `at`.
// Biases on gate/up/down (mlp_bias) are not taken: the caller runs such a model op by op.
at::Tensor llama_layers(const at::Tensor& h0, at::TensorList norm1, at::TensorList qkv, int64_t parts,
                        const c10::List<std::optional<at::Tensor>>& qkv_bias, at::TensorList o,
                        const c10::List<std::optional<at::Tensor>>& o_bias, at::TensorList norm2, at::TensorList gate,
                        at::TensorList up, at::TensorList down, const at::Tensor& cos, const at::Tensor& sin,
                        at::TensorList k_bufs, at::TensorList v_bufs, int64_t at_, const std::optional<at::Tensor>& keys,
                        int64_t heads, int64_t kv_heads, double scale, double eps) {
  const size_t L = norm1.size();
  TORCH_CHECK(parts >= 1 && qkv.size() == L * size_t(parts) && qkv_bias.size() == L && o.size() == L && o_bias.size() == L &&
              norm2.size() == L && gate.size() == L && up.size() == L && down.size() == L && k_bufs.size() == L &&
              v_bufs.size() == L, "thinkforge_cpu.llama_layers: every list must have one entry per layer (qkv: parts)");
  at::Tensor h = h0;
  for (size_t l = 0; l < L; ++l) {
    const at::Tensor mixed = linear(h, qkv.slice(l * parts, parts), qkv_bias.get(l), std::nullopt, norm1[l], eps);
    const at::Tensor attended = attend(mixed, cos, sin, k_bufs[l], v_bufs[l], at_, keys, heads, kv_heads, scale);
    h = linear(attended, {o[l]}, o_bias.get(l), h, std::nullopt, eps);
    h = linear(gated_silu(h, gate[l], up[l], norm2[l], eps), {down[l]}, std::nullopt, h, std::nullopt, eps);
  }
  return h;
}

}  // namespace

TORCH_LIBRARY(thinkforge_cpu, m) {
  m.def("linear(Tensor x, Tensor[] parts, Tensor? bias, Tensor? residual, Tensor? norm, float eps) -> Tensor");
  m.def("gated_silu(Tensor x, Tensor gate, Tensor up, Tensor? norm, float eps) -> Tensor");
  m.def("attend(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) k_buf, Tensor(b!) v_buf, int at, Tensor? keys, "
        "int heads, int kv_heads, float scale) -> Tensor");
  m.def("llama_layers(Tensor h, Tensor[] norm1, Tensor[] qkv, int parts, Tensor?[] qkv_bias, Tensor[] o, "
        "Tensor?[] o_bias, Tensor[] norm2, Tensor[] gate, Tensor[] up, Tensor[] down, Tensor cos, Tensor sin, "
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

_STATE: dict = {}  # "ops": torch.ops.thinkforge_cpu once loaded, or "why": the reason it is not


def _vector_unit() -> str | None:
    """The 8-float vector unit the loops compile to here ("avx2" or "neon"), or None where they would be SSE2 only
    (oneDNN picks AVX there itself, and its products were faster than SSE2 loops: 0.48-0.91x, dev/LOG.md)."""
    import torch

    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64"):
        return "avx2" if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") else None
    return "neon" if machine in ("aarch64", "arm64") else None


def _flags(unit: str) -> list[str]:
    """Compiler flags: OpenMP (torch's `at::parallel_for` threads by it: the process's one OpenMP runtime, torch's
    own libgomp, serves both); AVX2 + FMA on x86 (NEON is Arm's baseline)."""
    return ["-O3", "-ffp-contract=fast", "-fopenmp"] + (["-mavx2", "-mfma"] if unit == "avx2" else [])


def _ninja_on_path() -> None:
    """torch's builder runs `ninja` from PATH; the `ninja` package's binary is in the venv's bin folder, which a
    process started as `.venv/bin/python` (the Makefile, a service) does not have on PATH."""
    import shutil
    import sys

    if shutil.which("ninja") is None:
        for folder in (os.path.dirname(sys.executable), getattr(_import_ninja(), "BIN_DIR", None)):
            if folder and os.path.isfile(os.path.join(folder, "ninja")):
                os.environ["PATH"] = folder + os.pathsep + os.environ.get("PATH", "")
                return


def _import_ninja():
    try:
        import ninja

        return ninja
    except ImportError:
        return None


def ops():
    """`torch.ops.thinkforge_cpu` (`linear`, `gated_silu`, `attend`, `llama_layers`), built on first use (a line on a
    terminal's stderr says so), or None: turned off (`THINKFORGE_CPU_KERNELS=0`, read once a process), not Linux,
    no AVX2 / NEON (`why_not()` says which), or the build failed: warned once a process; a compiler's error is kept
    with the folder to delete to retry (not compiled again by every process)."""
    if "ops" in _STATE or "why" in _STATE:
        return _STATE.get("ops")
    if os.environ.get("THINKFORGE_CPU_KERNELS", "1").strip().lower() in ("0", "false", "no", "off"):
        _STATE["why"] = "THINKFORGE_CPU_KERNELS=0"
        return None
    if platform.system() != "Linux":  # torch's threads there are OpenMP's, which these are built against
        _STATE["why"] = f"the CPU kernels are built on Linux only, not {platform.system()}"
        return None
    import torch

    unit = _vector_unit()
    if unit is None:
        _STATE["why"] = (f"this CPU has no AVX2 (torch's capability: {torch.backends.cpu.get_cpu_capability()}): "
                         "oneDNN's products are faster than SSE2 loops")
        return None
    try:
        _STATE["ops"] = _build(unit)
    except Exception as e:  # no compiler or ninja, an unsupported toolchain: oneDNN's products stay
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        _STATE["why"] = first
        warnings.warn(f"thinkforge: decoding a few rows keeps oneDNN's products: {_STATE['why']}", stacklevel=2)
    return _STATE.get("ops")


def _build(unit: str):
    """Build (or load, when built) the kernels in torch's extensions folder, under a name that carries a hash of the
    source, flags and torch install (two versions or venvs sharing the folder never load each other's), holding a
    lock of ours that the OS releases if the process dies (torch's own lock file, left behind by a build killed
    midway, would make every later process wait forever: it is removed while ours is held). What is said while
    waiting or building goes to stderr where it is a terminal (a CLI's error stays its one line elsewhere)."""
    import fcntl

    import torch
    from torch.utils.cpp_extension import load_inline

    flags, name = _flags(unit), _name(unit)
    folder = os.path.join(_root(), name)
    os.makedirs(folder, exist_ok=True)
    failed = os.path.join(folder, "failed.txt")
    with open(os.path.join(_root(), f"{name}.lock"), "w") as held:
        try:
            fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _say(f"waiting for another process's build of the CPU decode kernels in {folder}")
            fcntl.flock(held, fcntl.LOCK_EX)
        if os.path.exists(failed):
            with open(failed) as f:
                raise RuntimeError(f"the CPU kernels did not build ({_diagnostic(f.read())}); see {failed}, delete "
                                   f"{folder} to retry")
        torch_lock = os.path.join(folder, "lock")
        if os.path.exists(torch_lock):  # only a build of ours takes it, and none runs while we hold ours
            os.remove(torch_lock)
        if not os.path.exists(os.path.join(folder, f"{name}.so")):
            _say(f"building the CPU decode kernels once for this machine (~10 s) in {folder}")
        _ninja_on_path()
        try:
            load_inline(name, [SOURCE], extra_cflags=flags, extra_ldflags=["-fopenmp"], build_directory=folder,
                        is_python_module=False, no_implicit_headers=True, verbose=False)
        except Exception as e:
            output = str(e)
            # Kept only for the compiler's own diagnostic, the same in every process; not for what may pass (ninja
            # interrupted by Ctrl-C, a compiler killed or missing for now, a full disk): those are retried.
            if "Error building extension" not in output or not _compiler_error(output):
                raise RuntimeError(f"the CPU kernels did not build ({_diagnostic(output)})") from e
            with open(failed, "w") as f:
                f.write(output)
            raise RuntimeError(f"the CPU kernels did not build ({_diagnostic(output)}); see {failed}, delete "
                               f"{folder} to retry") from e
    return torch.ops.thinkforge_cpu


def _say(line: str) -> None:
    import sys

    if sys.stderr.isatty():
        print(f"thinkforge: {line}", file=sys.stderr, flush=True)


def _compiler_error(output: str) -> bool:
    """A compiler's diagnostic in a failed build's output (`file:line:col: error: ...`), ninja not interrupted."""
    import re

    return "interrupted" not in output and re.search(r":\d+:(\d+:)? (fatal )?error: ", output) is not None


def _diagnostic(output: str) -> str:
    """The line of a failed build's output that says what failed: its first `error` line, else its first line (torch
    puts ninja's whole compile command first)."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    said = next((line for line in lines if "error" in line.lower() and "Error building extension" not in line), None)
    return (said or (lines[0] if lines else "no output"))[:300]


def _name(unit: str) -> str:
    """The build's name: the vector unit and a hash of the source, the flags, torch's version and install (a build
    names its venv's paths: two venvs sharing the folder would rebuild at every switch)."""
    import hashlib

    import torch

    digest = hashlib.sha256("\n".join([SOURCE, " ".join(_flags(unit)), torch.__version__, torch.__file__]).encode())
    digest = digest.hexdigest()[:12]
    return f"thinkforge_cpu_{unit}_{digest}"


def _root() -> str:
    """Where the kernels are built: TORCH_EXTENSIONS_DIR, else torch's extensions cache folder's py<version>_cpu
    (torch's own name for a CPU build; the build folder is passed to it explicitly)."""
    import sys

    from torch.utils.cpp_extension import get_default_build_root

    return os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(
        get_default_build_root(), f"py{sys.version_info.major}{sys.version_info.minor}_cpu")


def why_not() -> str | None:
    """Why `ops()` gave None (after it was called), else None."""
    return _STATE.get("why")
