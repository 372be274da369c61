// The int kernel's tiles (included by int_conv.cpp three times, each in a namespace of its own:
// for AVX-512BW, inside an avx512vnni target region with DSQ_VNNI defined, and inside an AMX target
// region with DSQ_AMX defined).
//
// out[p, o] = epilogue(bias[o] + sum over taps t, blocks j and weight planes k of
//     alpha[t, j, k, o] * step[p + t, j] * sum_c (u[p + t, j, c] - 128) * q[t, j, k, c, o])
// (one plane, or two for 8-bit weights: q = 16 hi + lo, the hi plane with alpha * 16)
// with u = mantissa + 128 (uint8; AMX reads the int8 mantissas u - 128 themselves) and q the int8
// VQK. The dot product of each unit (tap, block) is exact in int32:
// - AVX-512BW: vpmaddubsw multiplies u8 by s8 and adds pairs into int16 (exact: `chunk` steps of
//   4 channels stay below 2^15), vpmaddwd widens to int32;
// - VNNI: vpdpbusd multiplies u8 by s8 and adds groups of 4 into int32 in one instruction;
// - AMX-INT8: tdpbssd multiplies s8 by s8 and adds groups of 4 into int32 for a tile of 16
//   positions x 16 output channels over up to 64 channels (the plan's weights are already B
//   tiles: L / 4 rows of 16 outputs x 4 channels); its input is encoded as int8 mantissas (u - 128).
// 128 * sum_c q (`comp`) takes the offset out again in the other two. Each unit's epilogue, one
// multiply by the power-of-two step (exact) and one fused multiply-add with alpha in float64,
// happens in registers and L1 (AMX: from its int32 tile, stored to L1). The output epilogue (Out)
// applies the folded BatchNorm, the residual and the clamp of a fused activation.

constexpr int MR = 4;     // output positions that share each weight load
constexpr int RT = 8;     // groups of MR positions per tile, which share each unit's weights in L1
constexpr int PT = RT * MR;  // output positions per tile
constexpr int NVMAX = 4;  // vectors of 16 output channels per tile

// acc[0 .. 16) += d * step * alpha (d: 16 exact int32 dot products as two float64 halves; alpha
// as two float64 halves), in float64 (each product is exact)
inline void epilogue(double* acc, __m512d d0, __m512d d1, double step, __m512d alpha0, __m512d alpha1) {
  const __m512d sv = _mm512_set1_pd(step);
  _mm512_store_pd(acc, _mm512_fmadd_pd(_mm512_mul_pd(d0, sv), alpha0, _mm512_load_pd(acc)));
  _mm512_store_pd(acc + 8, _mm512_fmadd_pd(_mm512_mul_pd(d1, sv), alpha1, _mm512_load_pd(acc + 8)));
}

// The same for d = dot - comp (int32 lanes).
inline void epilogue(double* acc, __m512i dot, __m512i comp, double step, __m512d alpha0, __m512d alpha1) {
  const __m512i d = _mm512_sub_epi32(dot, comp);
  epilogue(acc, _mm512_cvtepi32_pd(_mm512_extracti64x4_epi64(d, 0)), _mm512_cvtepi32_pd(_mm512_extracti64x4_epi64(d, 1)),
           step, alpha0, alpha1);
}

// The output positions of one tile: PT of them (the last ones may repeat a valid one).
struct Rows {
  int64_t pix[PT];  // the input pixel that tap 0 reads
  int64_t dst[PT];  // where output channel 0 goes
  int64_t count;
};

// One unit's weights for the output vectors ov .. ov + NV - 1 (NV vectors of `k4` groups of 4
// channels), with their KDS (two float64 halves) and (uint8 inputs: not AMX) their offsets `comp`.
template <int NV>
struct Unit {
  const int8_t* w;
  __m512d alpha0[NV], alpha1[NV];
#ifndef DSQ_AMX
  __m512i comp[NV];
#endif

  Unit(const Args& a, int64_t unit, int64_t ov, int64_t k4) : w(a.w + (unit * (a.Op / 16) + ov) * k4 * 64) {
    const float* alpha = a.alpha + unit * a.Op + ov * 16;
    for (int v = 0; v < NV; v++) {
      alpha0[v] = _mm512_cvtps_pd(_mm256_loadu_ps(alpha + v * 16));
      alpha1[v] = _mm512_cvtps_pd(_mm256_loadu_ps(alpha + v * 16 + 8));
#ifndef DSQ_AMX
      comp[v] = _mm512_loadu_si512(a.comp + unit * a.Op + ov * 16 + v * 16);
#endif
    }
  }
};

// The encoded channels of block j that the output position at input pixel `pix` reads at tap t,
// and (in `step`) their BFP step.
inline const uint8_t* position(const Args& a, int64_t pix, int64_t t, int64_t j, float& step) {
  const int64_t p = pix + a.tap_off[t];
  step = a.step[p * a.nb + j];
  return a.u + p * a.nb * a.L + j * a.L;
}

#ifdef DSQ_AMX
constexpr int AR = 16;  // output positions per A tile (its rows, and the C tile's)
constexpr int AG = PT / AR;  // A tiles per tile
static_assert(PT % AR == 0, "a tile holds whole A tiles");

// The tile registers. Units of up to 64 channels: A (positions x channels) in 0, B (channels x 16
// outputs) of each output vector in 2 .. 5, C (positions x 16 outputs, int32) in 6 and 7 by
// turns. Longer units, in chunks of 64 channels and a last one of any multiple of 4: A and B of
// the chunks of 64 in 0 and 1, of the last in 2 and 3, C in 6 and 7.
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};  // bytes per row
  uint8_t rows[16] = {};

  void set(int tile, int r, int bytes) { rows[tile] = static_cast<uint8_t>(r), colsb[tile] = static_cast<uint16_t>(bytes); }
};

// This thread's tile registers, configured for units of a.L channels while it lives (tile state
// is per thread: each of at::parallel_for's threads sets its own), and the A tiles of a tile's
// output positions: their steps, and their input rows, copied where they are not evenly spaced.
struct TileState {
  std::vector<double> step;             // (T, nb, PT) the positions' steps
  std::vector<const uint8_t*> taps;     // (AG, T) each A tile's block 0 at each tap
  std::vector<uint8_t> rows;            // (AG, T, AR, C) copies of input rows
  int64_t stride[AG];                   // between each A tile's rows
  alignas(64) int32_t dots[2][AG * NVMAX * AR * 16];  // two units' int32 dot products

  explicit TileState(const Args& a) : step(a.T * a.nb * PT), taps(AG * a.T), rows(AG * a.T * AR * a.nb * a.L) {
    TileConfig c;
    const int last = static_cast<int>((a.L - 1) % 64 + 1);
    if (a.L <= 64) {
      c.set(0, AR, last);
      for (int v = 0; v < NVMAX; v++) c.set(2 + v, last / 4, 64);
    } else {
      c.set(0, AR, 64), c.set(1, 16, 64), c.set(2, AR, last), c.set(3, last / 4, 64);
    }
    c.set(6, AR, 64), c.set(7, AR, 64);
    asm volatile("" ::: "memory");  // _tile_loadconfig names only 8 bytes of c as read
    _tile_loadconfig(&c);
  }
  ~TileState() { _tile_release(); }

  // The A tiles of the positions of `rows` (pix) and their steps, once per tile: straight from the
  // input where AR positions are evenly spaced, else from copies (copied once, not per unit).
  void gather(const Args& a, const Rows& r) {
    const int64_t C = a.nb * a.L;
    for (int64_t g = 0; g < (r.count + AR - 1) / AR; g++) {
      const int64_t* pix = r.pix + g * AR;
      bool even = true;
      for (int i = 2; i < AR; i++) even = even && pix[i] - pix[i - 1] == pix[1] - pix[0];
      stride[g] = even ? (pix[1] - pix[0]) * C : C;
      for (int64_t t = 0; t < a.T; t++) {
        uint8_t* copy = rows.data() + (g * a.T + t) * AR * C;
        taps[g * a.T + t] = even ? a.u + (pix[0] + a.tap_off[t]) * C : copy;
        for (int i = 0; i < AR && !even; i++) std::memcpy(copy + i * C, a.u + (pix[i] + a.tap_off[t]) * C, C);
      }
    }
    for (int64_t t = 0; t < a.T; t++)
      for (int i = 0; i < PT; i++)
        for (int64_t j = 0; j < a.nb; j++) step[(t * a.nb + j) * PT + i] = a.step[(r.pix[i] + a.tap_off[t]) * a.nb + j];
  }
};

// The tile instructions, with tile numbers as template arguments (the intrinsics take them as
// literal tokens) and the memory they read or write named to the compiler.
template <int T>
inline void tile_zero() {
  asm volatile("tilezero %%tmm%c0" ::"i"(T));
}
template <int T>
inline void tile_load(const void* p, int64_t stride) {
  asm volatile("tileloadd (%0,%1,1), %%tmm%c2" ::"r"(p), "r"(stride), "i"(T) : "memory");
}
template <int C, int A, int B>
inline void tile_dpbssd() {
  asm volatile("tdpbssd %%tmm%c2, %%tmm%c1, %%tmm%c0" ::"i"(C), "i"(A), "i"(B));
}
template <int T>
inline void tile_store(void* p, int64_t stride) {
  asm volatile("tilestored %%tmm%c0, (%1,%2,1)" ::"i"(T), "r"(p), "r"(stride) : "memory");
}

// f(std::integral_constant<int, v>) for v = 0 .. N - 1: tile numbers from a loop.
template <int... V, class F>
inline void each(std::integer_sequence<int, V...>, F&& f) {
  (f(std::integral_constant<int, V>{}), ...);
}

// The int32 dot products of unit (t, j) (weights w: NV vectors of a.L / 4 rows of 64 bytes) for
// the `groups` A tiles of `in`, into dot[g][v]; each A tile is loaded once for every output vector
// and, in units of up to 64 channels, each B tile once for every A tile. C tiles take turns, so
// that one is stored while the next is summed.
template <int NV>
inline void unit_dots(const Args& a, const TileState& in, int64_t groups, int64_t t, int64_t j, const int8_t* w,
                      int32_t (*dot)[NV][AR][16]) {
  const int64_t k4 = a.L / 4;
  if (a.L <= 64) {
    each(std::make_integer_sequence<int, NV>{}, [&](auto v) { tile_load<2 + v>(w + v * k4 * 64, 64); });
    for (int64_t g = 0; g < groups; g++) {
      tile_load<0>(in.taps[g * a.T + t] + j * a.L, in.stride[g]);
      each(std::make_integer_sequence<int, NV>{}, [&](auto v) {
        tile_zero<6 + v % 2>();
        tile_dpbssd<6 + v % 2, 0, 2 + v>();
        tile_store<6 + v % 2>(dot[g][v], 64);
      });
    }
    return;
  }
  const int64_t last = (a.L - 1) / 64 * 64;  // in chunks of 64 channels summed in C (exact)
  for (int64_t g = 0; g < groups; g++) {
    const uint8_t* x = in.taps[g * a.T + t] + j * a.L;
    each(std::make_integer_sequence<int, NV>{}, [&](auto v) {
      const int8_t* b = w + v * k4 * 64;
      tile_zero<6 + v % 2>();
      for (int64_t c = 0; c < last; c += 64) {
        tile_load<0>(x + c, in.stride[g]);
        tile_load<1>(b + c * 16, 64);
        tile_dpbssd<6 + v % 2, 0, 1>();
      }
      tile_load<2>(x + last, in.stride[g]);
      tile_load<3>(b + last * 16, 64);
      tile_dpbssd<6 + v % 2, 2, 3>();
      tile_store<6 + v % 2>(dot[g][v], 64);
    });
  }
}

// One unit (tap t, block j = jp / planes, weights and scales u) of a tile, added into acc: the
// products of the next unit into the tile registers and out to `in`, then the epilogues of this
// one, whose products have long reached memory by then.
template <int NV, int K4>
inline void unit_sums(const Args& a, const Rows& rows, int64_t t, int64_t jp, const Unit<NV>& u,
                      double (*acc)[NV * 16], TileState& in) {
  const int64_t groups = (rows.count + AR - 1) / AR, units = a.nb * a.planes, i = t * units + jp;
  using Dots = int32_t(*)[NV][AR][16];
  auto dots = [&](int64_t n) {  // unit n's products into in.dots[n % 2]
    const int8_t* w = u.w + (n - i) * (a.Op / 16) * (a.L / 4) * 64;
    unit_dots<NV>(a, in, groups, n / units, n % units / a.planes, w, reinterpret_cast<Dots>(in.dots[n % 2]));
  };
  if (i == 0) dots(0);
  if (i + 1 < a.T * units) dots(i + 1);
  const Dots dot = reinterpret_cast<Dots>(in.dots[i % 2]);
  const double* step = in.step.data() + (t * a.nb + jp / a.planes) * PT;
  for (int64_t r = 0; r < groups * AR; r++)
    for (int v = 0; v < NV; v++) {
      const int32_t* d = dot[r / AR][v][r % AR];
      epilogue(acc[r] + v * 16, _mm512_cvtepi32_pd(_mm256_load_si256(reinterpret_cast<const __m256i*>(d))),
               _mm512_cvtepi32_pd(_mm256_load_si256(reinterpret_cast<const __m256i*>(d + 8))), step[r], u.alpha0[v],
               u.alpha1[v]);
    }
}
#else
// Tile state: none outside AMX.
struct TileState {
  explicit TileState(const Args&) {}
  void gather(const Args&, const Rows&) {}
};

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

// One unit (tap t, block j, weights and scales u) of a tile, added into acc, MR positions at a
// time.
template <int NV, int K4>
inline void unit_sums(const Args& a, const Rows& rows, int64_t t, int64_t jp, const Unit<NV>& u,
                      double (*acc)[NV * 16], TileState&) {
  const int64_t k4 = K4 ? K4 : a.L / 4, groups = (rows.count + MR - 1) / MR, j = jp / a.planes;
  for (int64_t g = 0; g < groups; g++) {
    const uint8_t* x[MR];
    float s[MR];
    for (int r = 0; r < MR; r++) x[r] = position(a, rows.pix[g * MR + r], t, j, s[r]);
    __m512i dot[MR][NV];
    unit_dots<NV, K4>(x, u.w, k4, a.chunk, dot);
    for (int v = 0; v < NV; v++)
      for (int r = 0; r < MR; r++) epilogue(acc[g * MR + r] + v * 16, dot[r][v], u.comp[v], s[r], u.alpha0[v], u.alpha1[v]);
  }
}
#endif

// One tile: PT output positions by NV vectors of 16 output channels, summed over every unit
// (tap, block, plane) in that order, then stored through the output epilogue. K4: the unit's
// length in groups of 4 channels when known at compile time, else 0.
template <int NV, int K4>
void tile(const Args& a, const Out& e, const Rows& rows, int64_t ov, TileState& in) {
  alignas(64) double acc[PT][NV * 16];
  std::fill(&acc[0][0], &acc[0][0] + PT * NV * 16, 0.0);
  in.gather(a, rows);
  for (int64_t t = 0; t < a.T; t++)
    for (int64_t jp = 0; jp < a.nb * a.planes; jp++) {
      const Unit<NV> u(a, t * a.nb * a.planes + jp, ov, K4 ? K4 : a.L / 4);
      unit_sums<NV, K4>(a, rows, t, jp, u, acc, in);
    }
  for (int64_t i = 0; i < rows.count; i++)
    if (e.ostride == 1)  // channels-last: 16 channels at a time
      for (int v = 0; v < NV; v++) e.store16(&acc[i][v * 16], ov * 16 + v * 16, rows.dst[i] + ov * 16 + v * 16);
    else
      for (int c = 0; c < NV * 16; c++) {
        const int64_t o = ov * 16 + c;
        e.store(acc[i][c], o, rows.dst[i] + o * e.ostride);
      }
}

template <int NV>
void tile_any(const Args& a, const Out& e, const Rows& rows, int64_t ov, TileState& in) {
#ifdef DSQ_AMX
  tile<NV, 0>(a, e, rows, ov, in);  // the tile configuration holds the length
#else
  const int64_t k4 = a.L / 4;
  if (k4 == 8 && a.chunk >= 8)
    tile<NV, 8>(a, e, rows, ov, in);
  else if (k4 == 4 && a.chunk >= 4)
    tile<NV, 4>(a, e, rows, ov, in);
  else
    tile<NV, 0>(a, e, rows, ov, in);
#endif
}

void run(const Args& a, const Out& e, int64_t N, int64_t Hp, int64_t Wp, int64_t OH, int64_t OW, int64_t sh,
         int64_t sw) {
  const int64_t P = N * OH * OW, row_tiles = (P + PT - 1) / PT, vectors = a.Op / 16;
  const int64_t col_tiles = (vectors + NVMAX - 1) / NVMAX;
  at::parallel_for(0, row_tiles * col_tiles, 1, [&](int64_t begin, int64_t end) {
    TileState in(a);
    Rows rows;
    for (int64_t i = begin; i < end; i++) {
      const int64_t ct = i / row_tiles, p0 = (i % row_tiles) * PT;
      rows.count = std::min<int64_t>(PT, P - p0);
      for (int64_t r = 0; r < PT; r++) {
        const int64_t p = p0 + (r < rows.count ? r : 0), n = p / (OH * OW), oy = p / OW % OH, ox = p % OW;
        rows.pix[r] = (n * Hp + oy * sh) * Wp + ox * sw;
        rows.dst[r] = e.nchw ? (n * a.Op * OH + oy) * OW + ox : p * a.Op;
      }
      const int64_t ov = ct * NVMAX;
      switch (std::min<int64_t>(NVMAX, vectors - ov)) {
        case 4: tile_any<4>(a, e, rows, ov, in); break;
        case 3: tile_any<3>(a, e, rows, ov, in); break;
        case 2: tile_any<2>(a, e, rows, ov, in); break;
        default: tile_any<1>(a, e, rows, ov, in); break;
      }
    }
  });
}
