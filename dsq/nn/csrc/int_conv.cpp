// The int backend's CPU kernel (dsq.nn.int_kernel loads it; docs/integer-backend.md): the CPU
// implementations of the ops dsq::int_conv and dsq::bfp_encode_u8, whose schemas and eager
// reference implementations dsq.nn.int_kernel defines, and two ops of its own that report and
// free the per-thread workspace.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <tuple>
#include <vector>

// out[p, o] = bias[o] + sum over taps t, blocks j and weight planes k of
//     alpha[t, j, k, o] * step[p + t, j] * sum_c (u[p + t, j, c] - 128) * q[t, j, k, c, o]
// (one plane, or two for 8-bit weights: q = 16 hi + lo, the hi plane with alpha * 16)
// with u = mantissa + 128 (uint8) and q the int8 VQK. vpmaddubsw multiplies u8 by s8 and adds
// pairs into int16 (exact: `chunk` steps of 4 channels stay below 2^15), vpmaddwd widens to int32,
// and 128 * sum_c q (`comp`) takes the offset out again: the dot product of each unit (tap, block)
// is exact. Its epilogue, one multiply by the power-of-two step (exact) and one fused multiply-add
// with alpha, happens in registers and L1, so no per-unit product ever reaches memory.
namespace {

constexpr int MR = 4;     // output positions that share each weight load
constexpr int RT = 8;     // groups of MR positions per tile, which share each unit's weights in L1
constexpr int NVMAX = 4;  // vectors of 16 output channels per tile

struct Args {
  const uint8_t* u;        // (N, Hp, Wp, nb * L)
  const float* step;       // (N, Hp, Wp, nb)
  const int8_t* w;         // (T, nb, planes, Op / 16, L / 4, 16, 4)
  const float* alpha;      // (T, nb, planes, Op)
  const int32_t* comp;     // (T, nb, planes, Op)
  const float* bias;       // (Op) or null
  const int64_t* tap_off;  // (T) pixel offset of each tap
  int64_t T, nb, planes, L, Op, chunk;
};

// acc[0 .. 16) += (dot - comp) * step * alpha[0 .. 16), in float64 (each product is exact)
inline void epilogue(double* acc, __m512i dot, __m512i comp, float step, const float* alpha) {
  const __m512i d = _mm512_sub_epi32(dot, comp);
  const __m512d sv = _mm512_set1_pd(step);
  const __m512d d0 = _mm512_mul_pd(_mm512_cvtepi32_pd(_mm512_extracti64x4_epi64(d, 0)), sv);
  const __m512d d1 = _mm512_mul_pd(_mm512_cvtepi32_pd(_mm512_extracti64x4_epi64(d, 1)), sv);
  _mm512_store_pd(acc, _mm512_fmadd_pd(d0, _mm512_cvtps_pd(_mm256_loadu_ps(alpha)), _mm512_load_pd(acc)));
  _mm512_store_pd(acc + 8, _mm512_fmadd_pd(d1, _mm512_cvtps_pd(_mm256_loadu_ps(alpha + 8)), _mm512_load_pd(acc + 8)));
}

// The output positions of one tile: RT x MR of them (the last ones may repeat a valid one).
struct Rows {
  int64_t pix[RT * MR];  // the input pixel that tap 0 reads
  int64_t dst[RT * MR];  // where output channel 0 goes
  int64_t count;
};

// int16 sums of uint8 x int8 pair products of MR = 4 rows over groups of 4 channels k0 .. k1 - 1;
// `w` holds the unit's weights, NV vectors of `k4` groups.
// acc += x in int16 lanes, in place (GCC would add into another register and copy it back).
static inline void add16(__m512i& acc, __m512i x) { asm("vpaddw %1, %0, %0" : "+v"(acc) : "v"(x)); }

template <int NV>
inline void pair_sums(const uint8_t* const* x, const int8_t* w, int64_t k4, int64_t k0, int64_t k1,
                      __m512i (&sum)[MR][NV]) {
  __m512i s0[NV], s1[NV], s2[NV], s3[NV];
  for (int v = 0; v < NV; v++) s0[v] = s1[v] = s2[v] = s3[v] = _mm512_setzero_si512();
  for (int64_t k = k0; k < k1; k++) {
    const __m512i b0 = _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(x[0] + 4 * k));
    const __m512i b1 = _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(x[1] + 4 * k));
    const __m512i b2 = _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(x[2] + 4 * k));
    const __m512i b3 = _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(x[3] + 4 * k));
    for (int v = 0; v < NV; v++) {
      const __m512i wv = _mm512_loadu_si512(w + (v * k4 + k) * 64);
      add16(s0[v], _mm512_maddubs_epi16(b0, wv));
      add16(s1[v], _mm512_maddubs_epi16(b1, wv));
      add16(s2[v], _mm512_maddubs_epi16(b2, wv));
      add16(s3[v], _mm512_maddubs_epi16(b3, wv));
    }
  }
  for (int v = 0; v < NV; v++) sum[0][v] = s0[v], sum[1][v] = s1[v], sum[2][v] = s2[v], sum[3][v] = s3[v];
}

// One tile: RT x MR output positions by NV vectors of 16 output channels, summed over every unit
// (tap, block). Each unit's weights are read once per tile and reused by its RT row groups. K4:
// the unit's length in groups of 4 channels when known at compile time (one chunk), else 0.
template <int NV, int K4>
void tile(const Args& a, const Rows& rows, int64_t ov, float* out, int64_t ostride) {
  static_assert(MR == 4, "pair_sums handles 4 rows");
  const __m512i ones = _mm512_set1_epi16(1);
  const int64_t C = a.nb * a.L, k4 = K4 ? K4 : a.L / 4, groups = (rows.count + MR - 1) / MR;
  alignas(64) double acc[RT][MR][NV * 16];
  std::fill(&acc[0][0][0], &acc[0][0][0] + RT * MR * NV * 16, 0.0);
  for (int64_t t = 0; t < a.T; t++) {
    for (int64_t jp = 0; jp < a.nb * a.planes; jp++) {
      const int64_t j = jp / a.planes, unit = t * a.nb * a.planes + jp;
      const int8_t* w = a.w + (unit * (a.Op / 16) + ov) * k4 * 64;
      const float* alpha = a.alpha + unit * a.Op + ov * 16;
      const int32_t* comp = a.comp + unit * a.Op + ov * 16;
      for (int64_t g = 0; g < groups; g++) {
        const uint8_t* x[MR];
        float s[MR];
        for (int r = 0; r < MR; r++) {
          const int64_t p = rows.pix[g * MR + r] + a.tap_off[t];
          x[r] = a.u + p * C + j * a.L;
          s[r] = a.step[p * a.nb + j];
        }
        __m512i sum[MR][NV], dot[MR][NV];
        if constexpr (K4 > 0) {  // one chunk: straight from the int16 sums to the epilogue
          pair_sums<NV>(x, w, k4, 0, K4, sum);
          for (int r = 0; r < MR; r++)
            for (int v = 0; v < NV; v++) dot[r][v] = _mm512_madd_epi16(sum[r][v], ones);
        } else {
          for (int r = 0; r < MR; r++)
            for (int v = 0; v < NV; v++) dot[r][v] = _mm512_setzero_si512();
          for (int64_t k0 = 0; k0 < k4; k0 += a.chunk) {
            pair_sums<NV>(x, w, k4, k0, std::min(k4, k0 + a.chunk), sum);
            for (int r = 0; r < MR; r++)
              for (int v = 0; v < NV; v++) dot[r][v] = _mm512_add_epi32(dot[r][v], _mm512_madd_epi16(sum[r][v], ones));
          }
        }
        for (int v = 0; v < NV; v++) {
          const __m512i cv = _mm512_loadu_si512(comp + v * 16);
          for (int r = 0; r < MR; r++) epilogue(&acc[g][r][v * 16], dot[r][v], cv, s[r], alpha + v * 16);
        }
      }
    }
  }
  for (int64_t i = 0; i < rows.count; i++)
    for (int c = 0; c < NV * 16; c++) {
      const int64_t o = ov * 16 + c;
      const double b = a.bias ? static_cast<double>(a.bias[o]) : 0.0;
      out[rows.dst[i] + o * ostride] = static_cast<float>(acc[i / MR][i % MR][c] + b);
    }
}

template <int NV>
void tile_any(const Args& a, const Rows& rows, int64_t ov, float* out, int64_t ostride) {
  const int64_t k4 = a.L / 4;
  if (k4 == 8 && a.chunk >= 8)
    tile<NV, 8>(a, rows, ov, out, ostride);
  else if (k4 == 4 && a.chunk >= 4)
    tile<NV, 4>(a, rows, ov, out, ostride);
  else
    tile<NV, 0>(a, rows, ov, out, ostride);
}

void run(const Args& a, int64_t N, int64_t Hp, int64_t Wp, int64_t OH, int64_t OW, int64_t sh, int64_t sw, bool nchw,
         float* out) {
  const int64_t P = N * OH * OW, per_tile = RT * MR, row_tiles = (P + per_tile - 1) / per_tile, vectors = a.Op / 16;
  const int64_t col_tiles = (vectors + NVMAX - 1) / NVMAX, ostride = nchw ? OH * OW : 1;
  at::parallel_for(0, row_tiles * col_tiles, 1, [&](int64_t begin, int64_t end) {
    Rows rows;
    for (int64_t i = begin; i < end; i++) {
      const int64_t ct = i / row_tiles, p0 = (i % row_tiles) * per_tile;
      rows.count = std::min<int64_t>(per_tile, P - p0);
      for (int64_t r = 0; r < per_tile; r++) {
        const int64_t p = p0 + (r < rows.count ? r : 0), n = p / (OH * OW), oy = p / OW % OH, ox = p % OW;
        rows.pix[r] = (n * Hp + oy * sh) * Wp + ox * sw;
        rows.dst[r] = nchw ? (n * a.Op * OH + oy) * OW + ox : p * a.Op;
      }
      const int64_t ov = ct * NVMAX;
      switch (std::min<int64_t>(NVMAX, vectors - ov)) {
        case 4: tile_any<4>(a, rows, ov, out, ostride); break;
        case 3: tile_any<3>(a, rows, ov, out, ostride); break;
        case 2: tile_any<2>(a, rows, ov, out, ostride); break;
        default: tile_any<1>(a, rows, ov, out, ostride); break;
      }
    }
  });
}

}  // namespace

// The BFP steps of 16 blocks whose peaks are in `peak`: 2^(e - (bits - 1)) with e the frexp
// exponent of the peak (floor(log2 peak) + 1; 0 for a zero peak), as dsq.formats.bfp does it.
static inline __m512 bfp_steps(__m512 peak, int64_t bits) {
  const __m512 k = _mm512_add_ps(_mm512_getexp_ps(peak), _mm512_set1_ps(static_cast<float>(2 - bits)));
  const __m512 s = _mm512_scalef_ps(_mm512_set1_ps(1.f), k);
  const __mmask16 zero = _mm512_cmp_ps_mask(peak, _mm512_setzero_ps(), _CMP_EQ_OQ);
  return _mm512_mask_blend_ps(zero, s, _mm512_set1_ps(std::ldexp(1.f, static_cast<int>(1 - bits))));
}

// uint8 mantissas + 128 of 16 values x with steps s: x / s rounded half to even, clamped to +-lim.
// x / s is x * (1 / s), exactly, where 1 / s is a float (s >= 2^-126): no division then.
static inline __m128i bfp_mantissas(__m512 x, __m512 s, __m512 lim) {
  const __mmask16 tiny = _mm512_cmp_ps_mask(s, _mm512_set1_ps(std::ldexp(1.f, -126)), _CMP_LT_OQ);
  const __m512 q = tiny ? _mm512_div_ps(x, s) : _mm512_mul_ps(x, _mm512_div_ps(_mm512_set1_ps(1.f), s));
  __m512 m = _mm512_roundscale_ps(q, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  m = _mm512_min_ps(_mm512_max_ps(m, _mm512_sub_ps(_mm512_setzero_ps(), lim)), lim);
  return _mm512_cvtepi32_epi8(_mm512_add_epi32(_mm512_cvtps_epi32(m), _mm512_set1_epi32(128)));
}

static inline __mmask16 first(int64_t n) { return n >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << n) - 1); }

// BFP encoding of a float32 input (N, C, H, W), as dsq.formats.bfp_encode does it (per block of
// channels at each pixel: e = frexp exponent of the peak, step = 2^(e - (bits - 1)), mantissa =
// x / step rounded half to even and clamped), written the way the kernel reads it: channels-last
// uint8 mantissa + 128 (N, Hp, Wp, nb * run), `run` channels per block (128 past the channels),
// and steps (N, Hp, Wp, nb), zero-padded by `pads` pixels (left, right, top, bottom). One pass: a
// contiguous (NCHW) input is read along its rows, 16 pixels at a time, a channels-last one along
// its channels.
void encode(const at::Tensor& x, int64_t bits, int64_t block, int64_t run, c10::IntArrayRef pads,
            uint8_t* up, float* sp) {
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
        std::memset(up + i * Wp * D, 128, Wp * D);
        std::fill(sp + i * Wp * nb, sp + (i + 1) * Wp * nb, 0.f);
        continue;
      }
      std::memset(up + i * Wp * D, 128, pads[0] * D);
      std::memset(up + (o0 + W) * D, 128, pads[1] * D);
      std::fill(sp + i * Wp * nb, sp + o0 * nb, 0.f);
      std::fill(sp + (o0 + W) * nb, sp + (i + 1) * Wp * nb, 0.f);
      const float* row = xp + n * sn + y * sy;
      for (int64_t j = 0; j < nb; j++) {
        const int64_t c0 = j * block, c1 = std::min(C, c0 + block);
        if (c1 - c0 < run)
          for (int64_t w = 0; w < W; w++) std::memset(up + (o0 + w) * D + j * run + c1 - c0, 128, run - (c1 - c0));
        if (rows) {  // 16 pixels of a row at a time
          for (int64_t w0 = 0; w0 < W; w0 += 16) {
            const __mmask16 mask = first(W - w0);
            const int64_t count = std::min<int64_t>(16, W - w0);
            __m512 peak = _mm512_setzero_ps();
            for (int64_t c = c0; c < c1; c++)
              peak = _mm512_max_ps(peak, _mm512_abs_ps(_mm512_maskz_loadu_ps(mask, row + c * sc + w0)));
            const __m512 s = bfp_steps(peak, bits);
            alignas(64) float sv[16];
            _mm512_store_ps(sv, s);
            for (int64_t w = 0; w < count; w++) sp[(o0 + w0 + w) * nb + j] = sv[w];
            for (int64_t c = c0; c < c1; c++) {
              alignas(16) uint8_t m[16];
              _mm_store_si128(reinterpret_cast<__m128i*>(m),
                              bfp_mantissas(_mm512_maskz_loadu_ps(mask, row + c * sc + w0), s, lim));
              uint8_t* dst = up + (o0 + w0) * D + j * run + c - c0;
              for (int64_t w = 0; w < count; w++) dst[w * D] = m[w];
            }
          }
        } else {  // channels-last: one pixel at a time, 16 channels at a time
          for (int64_t w = 0; w < W; w++) {
            const float* px = row + w * sx;
            __m512 peak = _mm512_setzero_ps();
            for (int64_t c = c0; c < c1; c += 16)
              peak = _mm512_max_ps(peak, _mm512_abs_ps(_mm512_maskz_loadu_ps(first(c1 - c), px + c)));
            const __m512 st = bfp_steps(_mm512_set1_ps(_mm512_reduce_max_ps(peak)), bits);
            sp[(o0 + w) * nb + j] = _mm512_cvtss_f32(st);
            for (int64_t c = c0; c < c1; c += 16)
              _mm_mask_storeu_epi8(up + (o0 + w) * D + j * run + c - c0, first(c1 - c),
                                   bfp_mantissas(_mm512_maskz_loadu_ps(first(c1 - c), px + c), st, lim));
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

// The encoded input of the last call from this thread, kept for the next one.
std::vector<uint8_t>& thread_workspace() {
  thread_local std::vector<uint8_t> workspace;
  return workspace;
}

int64_t workspace_bytes() { return static_cast<int64_t>(thread_workspace().capacity()); }

void release_workspace() { std::vector<uint8_t>().swap(thread_workspace()); }

// A DSConv layer on integers: BFP-encode x (N, C, H, W) into a workspace that is kept from call
// to call (no fresh pages to fault in), then the kernel. Returns (N, O', OH, OW) if `nchw`, else
// (N, OH, OW, O'), float32.
at::Tensor conv(const at::Tensor& x, const at::Tensor& w, const at::Tensor& alpha,
                   const at::Tensor& comp,
                   const c10::optional<at::Tensor>& bias, c10::IntArrayRef kernel, c10::IntArrayRef stride,
                   c10::IntArrayRef dilation, c10::IntArrayRef pads, int64_t bits, int64_t act_block, int64_t chunk,
                   bool nchw) {
  TORCH_CHECK(w.dtype() == at::kChar && w.is_contiguous() && alpha.is_contiguous() && comp.is_contiguous() &&
              alpha.dtype() == at::kFloat && comp.dtype() == at::kInt, "plan tensors");
  TORCH_CHECK(kernel.size() == 2 && stride.size() == 2 && dilation.size() == 2 && pads.size() == 4, "arguments");
  const int64_t N = x.size(0), Hp = x.size(2) + pads[2] + pads[3], Wp = x.size(3) + pads[0] + pads[1];
  const int64_t kh = kernel[0], kw = kernel[1], sh = stride[0], sw = stride[1], dh = dilation[0], dw = dilation[1];
  TORCH_CHECK(alpha.dim() == 4 && comp.sizes() == alpha.sizes(), "plan shapes");
  Args a{nullptr, nullptr, w.data_ptr<int8_t>(), alpha.data_ptr<float>(), comp.data_ptr<int32_t>(), nullptr, nullptr,
         alpha.size(0), alpha.size(1), alpha.size(2), w.numel() / alpha.numel(), alpha.size(3), chunk};
  TORCH_CHECK(a.L % 4 == 0 && a.Op % 16 == 0 && a.T == kh * kw && chunk > 0, "plan shapes");
  TORCH_CHECK((x.size(1) + act_block - 1) / act_block == a.nb, "activation blocks must match the weight blocks");
  if (bias && bias->defined()) {
    TORCH_CHECK(bias->dtype() == at::kFloat && bias->is_contiguous() && bias->numel() == a.Op, "bias");
    a.bias = bias->data_ptr<float>();
  }
  std::vector<uint8_t>& workspace = thread_workspace();
  const size_t u_bytes = (N * Hp * Wp * a.nb * a.L + 63) / 64 * 64, need = u_bytes + N * Hp * Wp * a.nb * sizeof(float);
  if (workspace.size() < need) workspace.resize(need);
  a.u = workspace.data();
  a.step = reinterpret_cast<float*>(workspace.data() + u_bytes);
  encode(x, bits, act_block, a.L, pads, workspace.data(), reinterpret_cast<float*>(workspace.data() + u_bytes));
  const int64_t OH = (Hp - dh * (kh - 1) - 1) / sh + 1, OW = (Wp - dw * (kw - 1) - 1) / sw + 1;
  TORCH_CHECK(OH > 0 && OW > 0, "the input is smaller than the kernel");
  std::vector<int64_t> tap_off(a.T);
  for (int64_t t = 0; t < a.T; t++) tap_off[t] = (t / kw) * dh * Wp + (t % kw) * dw;
  a.tap_off = tap_off.data();
  auto out = nchw ? at::empty({N, a.Op, OH, OW}, alpha.options()) : at::empty({N, OH, OW, a.Op}, alpha.options());
  run(a, N, Hp, Wp, OH, OW, sh, sw, nchw, out.data_ptr<float>());
  return out;
}

TORCH_LIBRARY_FRAGMENT(dsq, m) {
  m.def("int_workspace_bytes() -> int", &workspace_bytes);
  m.def("release_int_workspace() -> ()", &release_workspace);
}

TORCH_LIBRARY_IMPL(dsq, CPU, m) {
  m.impl("int_conv", TORCH_FN(conv));
  m.impl("bfp_encode_u8", TORCH_FN(bfp_encode_u8));
}
