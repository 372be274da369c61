// The int kernel's tiles (included by int_conv.cpp twice: once for AVX-512BW, once inside an
// avx512vnni target region with DSQ_VNNI defined, each time in a namespace of its own).
//
// out[p, o] = epilogue(bias[o] + sum over taps t, blocks j and weight planes k of
//     alpha[t, j, k, o] * step[p + t, j] * sum_c (u[p + t, j, c] - 128) * q[t, j, k, c, o])
// (one plane, or two for 8-bit weights: q = 16 hi + lo, the hi plane with alpha * 16)
// with u = mantissa + 128 (uint8) and q the int8 VQK. The dot product of each unit (tap, block)
// is exact in int32:
// - AVX-512BW: vpmaddubsw multiplies u8 by s8 and adds pairs into int16 (exact: `chunk` steps of
//   4 channels stay below 2^15), vpmaddwd widens to int32;
// - VNNI: vpdpbusd multiplies u8 by s8 and adds groups of 4 into int32 in one instruction.
// 128 * sum_c q (`comp`) takes the offset out again. Each unit's epilogue, one multiply by the
// power-of-two step (exact) and one fused multiply-add with alpha in float64, happens in registers
// and L1, so no per-unit product ever reaches memory. The output epilogue (Out) applies the
// folded BatchNorm, the residual and the clamp of a fused activation.

constexpr int MR = 4;     // output positions that share each weight load
constexpr int RT = 8;     // groups of MR positions per tile, which share each unit's weights in L1
constexpr int NVMAX = 4;  // vectors of 16 output channels per tile

// acc[0 .. 16) += (dot - comp) * step * alpha[0 .. 16) (alpha as two float64 halves), in float64
// (each product is exact)
inline void epilogue(double* acc, __m512i dot, __m512i comp, float step, __m512d alpha0, __m512d alpha1) {
  const __m512i d = _mm512_sub_epi32(dot, comp);
  const __m512d sv = _mm512_set1_pd(step);
  const __m512d d0 = _mm512_mul_pd(_mm512_cvtepi32_pd(_mm512_extracti64x4_epi64(d, 0)), sv);
  const __m512d d1 = _mm512_mul_pd(_mm512_cvtepi32_pd(_mm512_extracti64x4_epi64(d, 1)), sv);
  _mm512_store_pd(acc, _mm512_fmadd_pd(d0, alpha0, _mm512_load_pd(acc)));
  _mm512_store_pd(acc + 8, _mm512_fmadd_pd(d1, alpha1, _mm512_load_pd(acc + 8)));
}

#ifdef DSQ_VNNI
// s += the products of 4 uint8 (b) by 4 int8 (w) summed into each int32 lane (vpdpbusd: exact).
static inline void mac(__m512i& s, __m512i b, __m512i w) { s = _mm512_dpbusd_epi32(s, b, w); }
#else
// s += the products of uint8 (b) by int8 (w) summed in pairs into int16 lanes (vpmaddubsw), added
// in place (GCC would add into another register and copy it back).
static inline void mac(__m512i& s, __m512i b, __m512i w) {
  asm("vpaddw %1, %0, %0" : "+v"(s) : "v"(_mm512_maddubs_epi16(b, w)));
}
#endif

// Sums (int32 lanes with VNNI, int16 pair sums without) of MR = 4 rows over groups of 4 channels
// k0 .. k1 - 1; `w` holds the unit's weights, NV vectors of `k4` groups.
template <int NV>
inline void row_sums(const uint8_t* const* x, const int8_t* w, int64_t k4, int64_t k0, int64_t k1,
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
      mac(s0[v], b0, wv);
      mac(s1[v], b1, wv);
      mac(s2[v], b2, wv);
      mac(s3[v], b3, wv);
    }
  }
  for (int v = 0; v < NV; v++) sum[0][v] = s0[v], sum[1][v] = s1[v], sum[2][v] = s2[v], sum[3][v] = s3[v];
}

// int32 dot products of MR = 4 rows over groups of 4 channels 0 .. k4 - 1 (K4 if known, else 0):
// with VNNI in one go; without, `chunk` groups at a time in int16 pair sums, widened after each.
template <int NV, int K4>
inline void unit_dots(const uint8_t* const* x, const int8_t* w, int64_t k4, int64_t chunk, __m512i (&dot)[MR][NV]) {
  if constexpr (K4 > 0) k4 = K4;
#ifdef DSQ_VNNI
  row_sums<NV>(x, w, k4, 0, k4, dot);
#else
  const __m512i ones = _mm512_set1_epi16(1);
  __m512i sum[MR][NV];
  for (int r = 0; r < MR; r++)
    for (int v = 0; v < NV; v++) dot[r][v] = _mm512_setzero_si512();
  for (int64_t k0 = 0; k0 < k4; k0 += chunk) {
    row_sums<NV>(x, w, k4, k0, std::min(k4, k0 + chunk), sum);
    for (int r = 0; r < MR; r++)
      for (int v = 0; v < NV; v++) dot[r][v] = _mm512_add_epi32(dot[r][v], _mm512_madd_epi16(sum[r][v], ones));
  }
#endif
}

// The output positions of one tile: RT x MR of them (the last ones may repeat a valid one).
struct Rows {
  int64_t pix[RT * MR];  // the input pixel that tap 0 reads
  int64_t dst[RT * MR];  // where output channel 0 goes
  int64_t count;
};

// One tile: RT x MR output positions by NV vectors of 16 output channels, summed over every unit
// (tap, block). Each unit's weights are read once per tile and reused by its RT row groups. K4:
// the unit's length in groups of 4 channels when known at compile time, else 0.
template <int NV, int K4>
void tile(const Args& a, const Out& e, const Rows& rows, int64_t ov) {
  const int64_t C = a.nb * a.L, k4 = K4 ? K4 : a.L / 4, groups = (rows.count + MR - 1) / MR;
  alignas(64) double acc[RT][MR][NV * 16];
  std::fill(&acc[0][0][0], &acc[0][0][0] + RT * MR * NV * 16, 0.0);
  for (int64_t t = 0; t < a.T; t++) {
    for (int64_t jp = 0; jp < a.nb * a.planes; jp++) {
      const int64_t j = jp / a.planes, unit = t * a.nb * a.planes + jp;
      const int8_t* w = a.w + (unit * (a.Op / 16) + ov) * k4 * 64;
      const float* alpha = a.alpha + unit * a.Op + ov * 16;
      const int32_t* comp = a.comp + unit * a.Op + ov * 16;
      __m512d alpha0[NV], alpha1[NV];
      __m512i cv[NV];
      for (int v = 0; v < NV; v++) {
        alpha0[v] = _mm512_cvtps_pd(_mm256_loadu_ps(alpha + v * 16));
        alpha1[v] = _mm512_cvtps_pd(_mm256_loadu_ps(alpha + v * 16 + 8));
        cv[v] = _mm512_loadu_si512(comp + v * 16);
      }
      for (int64_t g = 0; g < groups; g++) {
        const uint8_t* x[MR];
        float s[MR];
        for (int r = 0; r < MR; r++) {
          const int64_t p = rows.pix[g * MR + r] + a.tap_off[t];
          x[r] = a.u + p * C + j * a.L;
          s[r] = a.step[p * a.nb + j];
        }
        __m512i dot[MR][NV];
        unit_dots<NV, K4>(x, w, k4, a.chunk, dot);
        for (int v = 0; v < NV; v++)
          for (int r = 0; r < MR; r++) epilogue(&acc[g][r][v * 16], dot[r][v], cv[v], s[r], alpha0[v], alpha1[v]);
      }
    }
  }
  for (int64_t i = 0; i < rows.count; i++)
    if (e.ostride == 1)  // channels-last: 16 channels at a time
      for (int v = 0; v < NV; v++) e.store16(&acc[i / MR][i % MR][v * 16], ov * 16 + v * 16, rows.dst[i] + ov * 16 + v * 16);
    else
      for (int c = 0; c < NV * 16; c++) {
        const int64_t o = ov * 16 + c;
        e.store(acc[i / MR][i % MR][c], o, rows.dst[i] + o * e.ostride);
      }
}

template <int NV>
void tile_any(const Args& a, const Out& e, const Rows& rows, int64_t ov) {
  const int64_t k4 = a.L / 4;
  if (k4 == 8 && a.chunk >= 8)
    tile<NV, 8>(a, e, rows, ov);
  else if (k4 == 4 && a.chunk >= 4)
    tile<NV, 4>(a, e, rows, ov);
  else
    tile<NV, 0>(a, e, rows, ov);
}

void run(const Args& a, const Out& e, int64_t N, int64_t Hp, int64_t Wp, int64_t OH, int64_t OW, int64_t sh,
         int64_t sw) {
  const int64_t P = N * OH * OW, per_tile = RT * MR, row_tiles = (P + per_tile - 1) / per_tile, vectors = a.Op / 16;
  const int64_t col_tiles = (vectors + NVMAX - 1) / NVMAX;
  at::parallel_for(0, row_tiles * col_tiles, 1, [&](int64_t begin, int64_t end) {
    Rows rows;
    for (int64_t i = begin; i < end; i++) {
      const int64_t ct = i / row_tiles, p0 = (i % row_tiles) * per_tile;
      rows.count = std::min<int64_t>(per_tile, P - p0);
      for (int64_t r = 0; r < per_tile; r++) {
        const int64_t p = p0 + (r < rows.count ? r : 0), n = p / (OH * OW), oy = p / OW % OH, ox = p % OW;
        rows.pix[r] = (n * Hp + oy * sh) * Wp + ox * sw;
        rows.dst[r] = e.nchw ? (n * a.Op * OH + oy) * OW + ox : p * a.Op;
      }
      const int64_t ov = ct * NVMAX;
      switch (std::min<int64_t>(NVMAX, vectors - ov)) {
        case 4: tile_any<4>(a, e, rows, ov); break;
        case 3: tile_any<3>(a, e, rows, ov); break;
        case 2: tile_any<2>(a, e, rows, ov); break;
        default: tile_any<1>(a, e, rows, ov); break;
      }
    }
  });
}
