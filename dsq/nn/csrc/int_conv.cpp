// The int backend's CPU kernel (dsq.nn.int_kernel loads it; docs/integer-backend.md): the CPU
// implementations of the ops dsq::int_conv, dsq::bfp_encode_u8 and dsq::bfp_round, whose schemas
// and eager reference implementations dsq.nn.int_kernel defines, and ops of its own that list the
// instruction sets it runs with here and report and free the per-thread workspace. The tiles are
// in int_tile.h, compiled for AVX-512BW, for AVX-512 VNNI and (where the compiler has it) AMX-INT8.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <cpuid.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>
#ifdef __linux__
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace {

struct Args {
  const uint8_t* u;        // (N, Hp, Wp, nb * L)
  const float* step;       // (N, Hp, Wp, nb)
  const int8_t* w;         // (T, nb, planes, Op / 16, L / 4, 16, 4)
  const float* alpha;      // (T, nb, planes, Op)
  const int32_t* comp;     // (T, nb, planes, Op)
  const int64_t* tap_off;  // (T) pixel offset of each tap
  int64_t T, nb, planes, L, Op, chunk;
};

// Where each output goes and what happens to it on the way: its float64 sum plus the bias, times
// the folded BatchNorm's scale plus its shift (two float64 roundings, in this order, as the
// eager path does them), rounded to float32, plus the residual (float32), clamped to [lo, hi].
struct Out {
  float* out;              // (N, Op, OH, OW) if nchw, else (N, OH, OW, Op)
  int64_t ostride;         // between output channels
  bool nchw;
  const float* bias;       // (Op) or null
  const double* scale;     // (Op) or null: the folded BatchNorm, with shift
  const double* shift;
  const float* residual;   // laid out as out, or null
  float lo, hi;            // a fused activation's clamp; -inf, inf for none (NaN passes)

  inline void store(double acc, int64_t o, int64_t i) const {
    double v = bias ? acc + static_cast<double>(bias[o]) : acc;
    if (scale) {
      v = v * scale[o];
      v = v + shift[o];
    }
    float y = static_cast<float>(v);
    if (residual) y = y + residual[i];
    out[i] = y < lo ? lo : (y > hi ? hi : y);
  }

  // The float64 steps of store() for the 8 output channels o .. o + 7, rounded to float32.
  __attribute__((always_inline)) inline __m256 rounded8(const double* acc, int64_t o) const {
    __m512d v = _mm512_loadu_pd(acc);
    if (bias) v = _mm512_add_pd(v, _mm512_cvtps_pd(_mm256_loadu_ps(bias + o)));
    if (scale) v = _mm512_add_pd(_mm512_mul_pd(v, _mm512_loadu_pd(scale + o)), _mm512_loadu_pd(shift + o));
    return _mm512_cvtpd_ps(v);
  }

  // store() of 16 consecutive output channels o .. o + 15, which lie side by side from out[i]
  // (channels-last): the same operations in the same order, 16 lanes at a time.
  __attribute__((always_inline)) inline void store16(const double* acc, int64_t o, int64_t i) const {
    const __m256 lo8 = rounded8(acc, o), hi8 = rounded8(acc + 8, o + 8);
    __m512 y = _mm512_insertf32x8(_mm512_castps256_ps512(lo8), hi8, 1);
    if (residual) y = _mm512_add_ps(y, _mm512_loadu_ps(residual + i));
    y = _mm512_min_ps(_mm512_set1_ps(hi), _mm512_max_ps(_mm512_set1_ps(lo), y));  // NaN passes: y is 2nd
    _mm512_storeu_ps(out + i, y);
  }
};

namespace bw {
#include "int_tile.h"
}  // namespace bw

#pragma GCC push_options
#pragma GCC target("avx512vnni")
namespace vnni {
#define DSQ_VNNI
#include "int_tile.h"
#undef DSQ_VNNI
}  // namespace vnni
#pragma GCC pop_options

// The AMX tiles need GCC 11 or later for their intrinsics (and an assembler that knows them:
// dsq.nn.int_kernel builds again with DSQ_NO_AMX if this part fails).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11 && !defined(DSQ_NO_AMX)
#define DSQ_AMX_TILES
#pragma GCC push_options
#pragma GCC target("amx-tile,amx-int8,avx512vnni")
namespace amx {
#define DSQ_AMX
#include "int_tile.h"
#undef DSQ_AMX
}  // namespace amx
#pragma GCC pop_options
#endif

// Whether the AMX tiles run here: built, a CPU with AMX-TILE and AMX-INT8 (CPUID leaf 7, EDX bits
// 24 and 25) and VNNI, an OS that saves tile state (XCR0 bits 17 and 18), and on Linux this
// process allowed to use it (arch_prctl ARCH_REQ_XCOMP_PERM for XTILEDATA; without it the first
// tile instruction raises SIGILL). Elsewhere no: untested.
bool detect_amx() {
#if defined(DSQ_AMX_TILES) && defined(__linux__)
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || (d >> 24 & 3) != 3 || !__builtin_cpu_supports("avx512vnni"))
    return false;
  if (!__get_cpuid(1, &a, &b, &c, &d) || !(c >> 27 & 1)) return false;  // OSXSAVE: xgetbv runs
  uint32_t lo, hi;
  asm volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  const long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
  return (lo >> 17 & 3) == 3 && syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
#else
  return false;
#endif
}

// detect_amx(), asked once per process.
bool amx_ready() {
  static const bool ready = detect_amx();
  return ready;
}

// The tiles of instruction set `isa` (isas()) over the output positions.
void run_tiles(c10::string_view isa, const Args& a, const Out& e, int64_t N, int64_t Hp, int64_t Wp, int64_t OH,
               int64_t OW, int64_t sh, int64_t sw) {
#ifdef DSQ_AMX_TILES
  if (isa == "amx") return amx::run(a, e, N, Hp, Wp, OH, OW, sh, sw);
#endif
  if (isa == "vnni") return vnni::run(a, e, N, Hp, Wp, OH, OW, sh, sw);
  bw::run(a, e, N, Hp, Wp, OH, OW, sh, sw);
}

}  // namespace

// The BFP steps of 16 blocks (`s`), with what dividing by them takes: 2^-log2(s) (`inverse`),
// and whether any step is below 2^-126 (`tiny`: its inverse is no float, so divide).
struct Steps {
  __m512 s, inverse;
  bool tiny;

  explicit Steps(__m512 steps)
      : s(steps),
        inverse(_mm512_scalef_ps(_mm512_set1_ps(1.f), _mm512_sub_ps(_mm512_setzero_ps(), _mm512_getexp_ps(steps)))),
        tiny(_mm512_cmp_ps_mask(steps, _mm512_set1_ps(std::ldexp(1.f, -126)), _CMP_LT_OQ) != 0) {}
};

// The BFP steps of 16 blocks whose peaks are in `peak`: 2^(e - (bits - 1)) with e the frexp
// exponent of the peak (floor(log2 peak) + 1), as dsq.formats.bfp does it: 2^(1 - bits) for a zero
// peak or a block that holds a NaN or an infinity (`odd`), and never below the smallest subnormal.
static inline Steps bfp_steps(__m512 peak, int64_t bits, __mmask16 odd = 0) {
  const __m512 k = _mm512_add_ps(_mm512_getexp_ps(peak), _mm512_set1_ps(static_cast<float>(2 - bits)));
  const __m512 s = _mm512_max_ps(_mm512_scalef_ps(_mm512_set1_ps(1.f), k), _mm512_set1_ps(std::ldexp(1.f, -149)));
  const __mmask16 zero = _mm512_cmp_ps_mask(peak, _mm512_setzero_ps(), _CMP_EQ_OQ) | odd;
  return Steps(_mm512_mask_blend_ps(zero, s, _mm512_set1_ps(std::ldexp(1.f, static_cast<int>(1 - bits)))));
}

// Which of 16 values are NaN or infinite.
static inline __mmask16 not_finite(__m512 x) { return _mm512_fpclass_ps_mask(x, 0x01 | 0x08 | 0x10 | 0x80); }

// Mantissas of 16 values x with steps s, as floats: x / s rounded half to even, clamped to +-lim
// (NaN stays NaN). x / s is x * 2^-log2(s), exactly, unless a step is tiny: no division then.
static inline __m512 bfp_round_mantissas(__m512 x, const Steps& s, __m512 lim) {
  const __m512 q = s.tiny ? _mm512_div_ps(x, s.s) : _mm512_mul_ps(x, s.inverse);
  const __m512 m = _mm512_roundscale_ps(q, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return _mm512_min_ps(lim, _mm512_max_ps(_mm512_sub_ps(_mm512_setzero_ps(), lim), m));  // returns m if NaN
}

// Mantissas + `zero` of 16 values x with steps s, as bytes (uint8 m + 128, or int8 m for zero 0).
static inline __m128i bfp_mantissas(__m512 x, const Steps& s, __m512 lim, uint8_t zero) {
  const __m512i m = _mm512_cvtps_epi32(bfp_round_mantissas(x, s, lim));
  return _mm512_cvtepi32_epi8(_mm512_add_epi32(m, _mm512_set1_epi32(zero)));
}

static inline __mmask16 first(int64_t n) { return n >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << n) - 1); }

// BFP encoding of a float32 input (N, C, H, W), as dsq.formats.bfp_encode does it (per block of
// channels at each pixel: e = frexp exponent of the peak, step = 2^(e - (bits - 1)), mantissa =
// x / step rounded half to even and clamped), written the way the kernel reads it: channels-last
// uint8 mantissa + 128 (or, for `zero` 0, int8 mantissas) (N, Hp, Wp, nb * run), `run` channels
// per block (a zero mantissa past the channels), and steps (N, Hp, Wp, nb), zero-padded by `pads`
// pixels (left, right, top, bottom). One pass: a contiguous (NCHW) input is read along its rows,
// 16 pixels at a time, a channels-last one along its channels.
void encode(const at::Tensor& x, int64_t bits, int64_t block, int64_t run, c10::IntArrayRef pads,
            uint8_t* up, float* sp, uint8_t zero = 128) {
  TORCH_CHECK(x.dtype() == at::kFloat && x.dim() == 4, "x: (N, C, H, W) float32");
  TORCH_CHECK(pads.size() == 4 && bits >= 2 && bits <= 8 && block > 0 && run >= std::min(block, x.size(1)),
              "arguments");
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), nb = (C + block - 1) / block;
  const int64_t sn = x.stride(0), sc = x.stride(1), sy = x.stride(2), sx = x.stride(3);
  TORCH_CHECK(sx == 1 || sc == 1, "x: contiguous or channels-last");
  const int64_t Hp = H + pads[2] + pads[3], Wp = W + pads[0] + pads[1], D = nb * run;
  const float* xp = x.data_ptr<float>();
  const __m512 lim = _mm512_set1_ps(static_cast<float>((1 << (bits - 1)) - 1));
  const bool rows = sx == 1 && (sc != 1 || W > 1);
  at::parallel_for(0, N * Hp, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; i++) {
      const int64_t n = i / Hp, y = i % Hp - pads[2], o0 = i * Wp + pads[0];
      if (y < 0 || y >= H) {  // a padding row
        std::memset(up + i * Wp * D, zero, Wp * D);
        std::fill(sp + i * Wp * nb, sp + (i + 1) * Wp * nb, 0.f);
        continue;
      }
      std::memset(up + i * Wp * D, zero, pads[0] * D);
      std::memset(up + (o0 + W) * D, zero, pads[1] * D);
      std::fill(sp + i * Wp * nb, sp + o0 * nb, 0.f);
      std::fill(sp + (o0 + W) * nb, sp + (i + 1) * Wp * nb, 0.f);
      const float* row = xp + n * sn + y * sy;
      for (int64_t j = 0; j < nb; j++) {  // the channels a ragged last block lacks
        const int64_t width = std::min(C, (j + 1) * block) - j * block;
        if (width < run)
          for (int64_t w = 0; w < W; w++) std::memset(up + (o0 + w) * D + j * run + width, zero, run - width);
      }
      if (rows) {  // 16 pixels of a row at a time, block after block
        for (int64_t j = 0; j < nb; j++) {
          const int64_t c0 = j * block, c1 = std::min(C, c0 + block);
          for (int64_t w0 = 0; w0 < W; w0 += 16) {
            const __mmask16 mask = first(W - w0);
            const int64_t count = std::min<int64_t>(16, W - w0);
            __m512 peak = _mm512_setzero_ps();
            for (int64_t c = c0; c < c1; c++)
              peak = _mm512_max_ps(peak, _mm512_abs_ps(_mm512_maskz_loadu_ps(mask, row + c * sc + w0)));
            const Steps s = bfp_steps(peak, bits);
            alignas(64) float sv[16];
            _mm512_store_ps(sv, s.s);
            for (int64_t w = 0; w < count; w++) sp[(o0 + w0 + w) * nb + j] = sv[w];
            for (int64_t c = c0; c < c1; c++) {
              alignas(16) uint8_t m[16];
              _mm_store_si128(reinterpret_cast<__m128i*>(m),
                              bfp_mantissas(_mm512_maskz_loadu_ps(mask, row + c * sc + w0), s, lim, zero));
              uint8_t* dst = up + (o0 + w0) * D + j * run + c - c0;
              for (int64_t w = 0; w < count; w++) dst[w * D] = m[w];
            }
          }
        }
      } else {  // channels-last: pixel after pixel, each block's 16 channels at a time
        for (int64_t w = 0; w < W; w++) {
          const float* px = row + w * sx;
          for (int64_t j = 0; j < nb; j++) {
            const int64_t c0 = j * block, c1 = std::min(C, c0 + block);
            __m512 peak = _mm512_setzero_ps();
            for (int64_t c = c0; c < c1; c += 16)
              peak = _mm512_max_ps(peak, _mm512_abs_ps(_mm512_maskz_loadu_ps(first(c1 - c), px + c)));
            const Steps st = bfp_steps(_mm512_set1_ps(_mm512_reduce_max_ps(peak)), bits);
            sp[(o0 + w) * nb + j] = _mm512_cvtss_f32(st.s);
            for (int64_t c = c0; c < c1; c += 16)
              _mm_mask_storeu_epi8(up + (o0 + w) * D + j * run + c - c0, first(c1 - c),
                                   bfp_mantissas(_mm512_maskz_loadu_ps(first(c1 - c), px + c), st, lim, zero));
          }
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> bfp_encode_u8(const at::Tensor& x, int64_t bits, int64_t block, int64_t run,
                                                  c10::IntArrayRef pads) {
  const int64_t nb = (x.size(1) + block - 1) / block, Hp = x.size(2) + pads[2] + pads[3];
  const int64_t Wp = x.size(3) + pads[0] + pads[1];
  auto u = at::empty({x.size(0), Hp, Wp, nb * run}, x.options().dtype(at::kByte));
  auto step = at::empty({x.size(0), Hp, Wp, nb}, x.options());
  encode(x, bits, block, run, pads, u.data_ptr<uint8_t>(), step.data_ptr<float>());
  return {u, step};
}

// x rounded to BFP along its channels (blocks of `block` channels at each position) and returned
// as floats in x's layout, as dsq.formats.bfp_quantize does it, in one pass: the simulated
// backend's input rounding. x: float32 (N, C, ...) whose positions are contiguous (NCHW) or whose
// channels are (channels-last, or (N, C)).
at::Tensor bfp_round(const at::Tensor& x, int64_t bits, int64_t block) {
  TORCH_CHECK(x.dtype() == at::kFloat && x.dim() >= 2 && bits >= 2 && bits <= 8 && block > 0, "arguments");
  const at::Tensor x3 = x.dim() == 2 ? x.unsqueeze(2) : x.flatten(2);
  auto out = at::empty_like(x);
  const at::Tensor o3 = x.dim() == 2 ? out.unsqueeze(2) : out.flatten(2);
  const int64_t N = x3.size(0), C = x3.size(1), S = x3.size(2), nb = (C + block - 1) / block;
  const int64_t sn = x3.stride(0), sc = x3.stride(1), ss = x3.stride(2);
  TORCH_CHECK(o3.strides() == x3.strides() && (ss == 1 || sc == 1), "x: contiguous or channels-last");
  const float* xp = x3.data_ptr<float>();
  float* op = o3.data_ptr<float>();
  const __m512 lim = _mm512_set1_ps(static_cast<float>((1 << (bits - 1)) - 1));
  if (ss == 1 && (sc != 1 || S > 1)) {  // along positions, per block of channels and run of positions
    // Each channel's run is read whole, once for the peaks and once more (from L2: the block's
    // runs take at most 256 KiB) to round: long sequential reads, which the prefetchers follow.
    const int64_t width = std::min(block, C), run = std::max<int64_t>(16, std::min((S + 15) / 16, (1 << 16) / 16 / width) * 16);
    const int64_t chunks = (S + run - 1) / run;
    // An output larger than the cores' L2 caches is written past the caches (non-temporal stores):
    // no read of each line before it is written, a third less memory traffic.
    const bool stream = x.numel() * sizeof(float) > (4 << 20);
    at::parallel_for(0, N * nb * chunks, 1, [&](int64_t begin, int64_t end) {
      std::vector<__m512> peak(run / 16);
      std::vector<__mmask16> odd(run / 16);
      std::vector<Steps> steps;
      for (int64_t i = begin; i < end; i++) {
        const int64_t n = i / (nb * chunks), j = i / chunks % nb, p0 = i % chunks * run, c1 = std::min(C, (j + 1) * block);
        const int64_t base = n * sn + p0, vectors = (std::min(run, S - p0) + 15) / 16;
        const auto mask = [&](int64_t v) { return first(S - p0 - 16 * v); };
        std::fill(peak.begin(), peak.end(), _mm512_setzero_ps());
        std::fill(odd.begin(), odd.end(), 0);
        for (int64_t c = j * block; c < c1; c++)
          for (int64_t v = 0; v < vectors; v++) {
            const __m512 x = _mm512_maskz_loadu_ps(mask(v), xp + base + c * sc + 16 * v);
            peak[v] = _mm512_max_ps(peak[v], _mm512_abs_ps(x));
            odd[v] |= not_finite(x);
          }
        steps.clear();
        for (int64_t v = 0; v < vectors; v++) steps.push_back(bfp_steps(peak[v], bits, odd[v]));
        for (int64_t c = j * block; c < c1; c++)
          for (int64_t v = 0; v < vectors; v++) {
            const __m512 x = _mm512_maskz_loadu_ps(mask(v), xp + base + c * sc + 16 * v);
            const __m512 y = _mm512_mul_ps(bfp_round_mantissas(x, steps[v], lim), steps[v].s);
            float* dst = op + base + c * sc + 16 * v;
            if (stream && mask(v) == 0xFFFF && reinterpret_cast<uintptr_t>(dst) % 64 == 0)
              _mm512_stream_ps(dst, y);
            else
              _mm512_mask_storeu_ps(dst, mask(v), y);
          }
      }
      _mm_sfence();
    });
    return out;
  }
  at::parallel_for(0, N * S, 16, [&](int64_t begin, int64_t end) {  // along channels, at each position
    for (int64_t i = begin; i < end; i++) {
      const int64_t base = i / S * sn + i % S * ss;
      for (int64_t j = 0; j < nb; j++) {
        const int64_t c0 = j * block, c1 = std::min(C, c0 + block);
        __m512 peak = _mm512_setzero_ps();
        __mmask16 odd = 0;
        for (int64_t c = c0; c < c1; c += 16) {
          const __m512 v = _mm512_maskz_loadu_ps(first(c1 - c), xp + base + c);
          peak = _mm512_max_ps(peak, _mm512_abs_ps(v));
          odd |= not_finite(v);
        }
        const Steps st = bfp_steps(_mm512_set1_ps(_mm512_reduce_max_ps(peak)), bits, odd ? 0xFFFF : 0);
        for (int64_t c = c0; c < c1; c += 16) {
          const __m512 v = _mm512_maskz_loadu_ps(first(c1 - c), xp + base + c);
          _mm512_mask_storeu_ps(op + base + c, first(c1 - c), _mm512_mul_ps(bfp_round_mantissas(v, st, lim), st.s));
        }
      }
    }
  });
  return out;
}

// The encoded input of the last call from this thread, kept for the next one.
std::vector<uint8_t>& thread_workspace() {
  thread_local std::vector<uint8_t> workspace;
  return workspace;
}

int64_t workspace_bytes() { return static_cast<int64_t>(thread_workspace().capacity()); }

void release_workspace() { std::vector<uint8_t>().swap(thread_workspace()); }

// The instruction sets whose kernels run on this CPU, best last.
std::vector<std::string> isas() {
  std::vector<std::string> found{"avx512bw"};
  if (__builtin_cpu_supports("avx512vnni")) found.push_back("vnni");
  if (amx_ready()) found.push_back("amx");
  return found;
}

const at::Tensor* given(const c10::optional<at::Tensor>& t) { return t && t->defined() ? &*t : nullptr; }

// The output epilogue into `out` (4-D, dense in `format`; its channels C along dim 1 if `nchw`,
// else last): bias (float32), folded BatchNorm (scale, shift: float64), residual (laid out as `out`),
// clamp to [lo, hi].
Out output_epilogue(const at::Tensor& out, at::MemoryFormat format, int64_t C, bool nchw,
                    const c10::optional<at::Tensor>& bias,
                    const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& shift,
                    const c10::optional<at::Tensor>& residual, double lo, double hi) {
  Out e{out.data_ptr<float>(), nchw ? out.size(2) * out.size(3) : 1, nchw, nullptr, nullptr, nullptr, nullptr,
        static_cast<float>(lo), static_cast<float>(hi)};
  if (const at::Tensor* b = given(bias)) {
    TORCH_CHECK(b->dtype() == at::kFloat && b->is_contiguous() && b->numel() == C, "bias");
    e.bias = b->data_ptr<float>();
  }
  const at::Tensor *g = given(scale), *h = given(shift);
  TORCH_CHECK(!g == !h, "scale and shift go together");
  if (g) {
    TORCH_CHECK(g->dtype() == at::kDouble && h->dtype() == at::kDouble && g->is_contiguous() && h->is_contiguous() &&
                g->numel() == C && h->numel() == C, "scale, shift: float64 (O')");
    e.scale = g->data_ptr<double>();
    e.shift = h->data_ptr<double>();
  }
  if (const at::Tensor* r = given(residual)) {
    TORCH_CHECK(r->dtype() == at::kFloat && r->sizes() == out.sizes() && r->is_contiguous(format),
                "residual: laid out as the output");
    e.residual = r->data_ptr<float>();
  }
  return e;
}

// The output epilogue (no bias) on float64 sums `acc` (N, C, H, W), contiguous or channels-last:
// float32 in acc's layout, the same bit for bit as dsq.nn.epilogue.Epilogue.apply, in one pass.
at::Tensor finish_f64(const at::Tensor& acc, const c10::optional<at::Tensor>& scale,
                      const c10::optional<at::Tensor>& shift, const c10::optional<at::Tensor>& residual, double lo,
                      double hi) {
  TORCH_CHECK(acc.dtype() == at::kDouble && acc.dim() == 4, "acc: (N, C, H, W) float64");
  const bool nchw = acc.is_contiguous();
  TORCH_CHECK(nchw || acc.is_contiguous(at::MemoryFormat::ChannelsLast), "acc: contiguous or channels-last");
  const at::MemoryFormat format = nchw ? at::MemoryFormat::Contiguous : at::MemoryFormat::ChannelsLast;
  auto out = at::empty(acc.sizes(), acc.options().dtype(at::kFloat).memory_format(format));
  const int64_t C = acc.size(1), S = acc.size(2) * acc.size(3), positions = acc.size(0) * S;
  const Out e = output_epilogue(out, format, C, nchw, c10::nullopt, scale, shift, residual, lo, hi);
  const double* a = acc.data_ptr<double>();
  at::parallel_for(0, nchw ? acc.size(0) * C : positions, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; i++)
      if (nchw)  // a plane of one channel
        for (int64_t k = i * S; k < (i + 1) * S; k++) e.store(a[k], i % C, k);
      else {  // the channels of one position
        int64_t o = 0;
        for (; o + 16 <= C; o += 16) e.store16(a + i * C + o, o, i * C + o);
        for (; o < C; o++) e.store(a[i * C + o], o, i * C + o);
      }
  });
  return out;
}

// A DSConv layer on integers: BFP-encode x (N, C, H, W) into a workspace that is kept from call
// to call (no fresh pages to fault in), then the kernel of instruction set `isa` (isas()), with
// the output epilogue Out: bias, folded BatchNorm (scale, shift: float64), residual (laid out as
// the output), clamp to [lo, hi]. Returns (N, O', OH, OW) if `nchw`, else (N, OH, OW, O'), float32.
at::Tensor conv(const at::Tensor& x, const at::Tensor& w, const at::Tensor& alpha, const at::Tensor& comp,
                const c10::optional<at::Tensor>& bias, c10::IntArrayRef kernel, c10::IntArrayRef stride,
                c10::IntArrayRef dilation, c10::IntArrayRef pads, int64_t bits, int64_t act_block, int64_t chunk,
                bool nchw, const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& shift,
                const c10::optional<at::Tensor>& residual, double lo, double hi, c10::string_view isa) {
  TORCH_CHECK(w.dtype() == at::kChar && w.is_contiguous() && alpha.is_contiguous() && comp.is_contiguous() &&
              alpha.dtype() == at::kFloat && comp.dtype() == at::kInt, "plan tensors");
  TORCH_CHECK(kernel.size() == 2 && stride.size() == 2 && dilation.size() == 2 && pads.size() == 4, "arguments");
  TORCH_CHECK(isa == "amx" || isa == "vnni" || isa == "avx512bw", "unknown instruction set ", isa);
  TORCH_CHECK(isa != "vnni" || __builtin_cpu_supports("avx512vnni"), "this CPU has no AVX-512 VNNI");
  TORCH_CHECK(isa != "amx" || amx_ready(), "this CPU (or its OS) does not run AMX-INT8");
  const int64_t N = x.size(0), Hp = x.size(2) + pads[2] + pads[3], Wp = x.size(3) + pads[0] + pads[1];
  const int64_t kh = kernel[0], kw = kernel[1], sh = stride[0], sw = stride[1], dh = dilation[0], dw = dilation[1];
  TORCH_CHECK(alpha.dim() == 4 && comp.sizes() == alpha.sizes(), "plan shapes");
  Args a{nullptr, nullptr, w.data_ptr<int8_t>(), alpha.data_ptr<float>(), comp.data_ptr<int32_t>(), nullptr,
         alpha.size(0), alpha.size(1), alpha.size(2), w.numel() / alpha.numel(), alpha.size(3), chunk};
  TORCH_CHECK(a.L % 4 == 0 && a.Op % 16 == 0 && a.T == kh * kw && chunk > 0, "plan shapes");
  TORCH_CHECK((x.size(1) + act_block - 1) / act_block == a.nb, "activation blocks must match the weight blocks");
  const int64_t OH = (Hp - dh * (kh - 1) - 1) / sh + 1, OW = (Wp - dw * (kw - 1) - 1) / sw + 1;
  TORCH_CHECK(OH > 0 && OW > 0, "the input is smaller than the kernel");
  auto out = nchw ? at::empty({N, a.Op, OH, OW}, alpha.options()) : at::empty({N, OH, OW, a.Op}, alpha.options());
  const Out e = output_epilogue(out, at::MemoryFormat::Contiguous, a.Op, nchw, bias, scale, shift, residual, lo, hi);
  std::vector<uint8_t>& workspace = thread_workspace();
  const size_t u_bytes = (N * Hp * Wp * a.nb * a.L + 63) / 64 * 64, need = u_bytes + N * Hp * Wp * a.nb * sizeof(float);
  if (workspace.size() < need) workspace.resize(need);
  a.u = workspace.data();
  a.step = reinterpret_cast<float*>(workspace.data() + u_bytes);
  // AMX multiplies int8 by int8 (tdpbssd): no offset to take out; the others uint8 m + 128 by int8.
  encode(x, bits, act_block, a.L, pads, workspace.data(), reinterpret_cast<float*>(workspace.data() + u_bytes),
         isa == "amx" ? 0 : 128);
  std::vector<int64_t> tap_off(a.T);
  for (int64_t t = 0; t < a.T; t++) tap_off[t] = (t / kw) * dh * Wp + (t % kw) * dw;
  a.tap_off = tap_off.data();
  run_tiles(isa, a, e, N, Hp, Wp, OH, OW, sh, sw);
  return out;
}

TORCH_LIBRARY_FRAGMENT(dsq, m) {
  m.def("int_isas() -> str[]", &isas);
  m.def("int_workspace_bytes() -> int", &workspace_bytes);
  m.def("release_int_workspace() -> ()", &release_workspace);
}

TORCH_LIBRARY_IMPL(dsq, CPU, m) {
  m.impl("int_conv", TORCH_FN(conv));
  m.impl("bfp_encode_u8", TORCH_FN(bfp_encode_u8));
  m.impl("bfp_round", TORCH_FN(bfp_round));
  m.impl("finish_f64", TORCH_FN(finish_f64));
}
