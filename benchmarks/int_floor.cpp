// What the int kernel's two inner parts cost here, one thread: the floor under a block-scaled conv
// (docs/integer-backend.md, "What limits int-fused").
// 1. One AMX-INT8 tile instruction. With block scales every unit of 32 channels needs its own
//    tdpbssd (half its 64-channel depth) and its own tilestored, where an int8 conv with one scale
//    per output channel sums its whole reduction in the tile and stores once. In ns per
//    instruction, for units of K channels:
//    - tdpbssd on four independent C tiles (throughput), and on one (latency);
//    - tilezero + tdpbssd + tilestored, on four C tiles in turn (the kernel's pattern);
//    - tilestored alone.
// 2. One unit's epilogue, in ns per 16 outputs (one position, 16 output channels), over a unit's
//    stored 16 x 64 int32 products:
//    - exact: the kernel's float64 step (convert, times the power-of-two step, fused multiply-add
//      with alpha into the float64 sum in L1);
//    - the same with the sums held in registers (no kernel can: 16 x 64 float64 sums fill 128);
//    - float32 sums in L1 (convert, alpha times step, fused multiply-add): not exact, the least
//      any block-scaled kernel needs per product.
//
//   g++ -O2 -mamx-tile -mamx-int8 -mavx512f -mavx512dq benchmarks/int_floor.cpp -o /tmp/int_floor
//   /tmp/int_floor 32 && /tmp/int_floor 64      # Linux, a CPU with AMX-INT8
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

alignas(64) int8_t A[16 * 64], B[16 * 64];
alignas(64) int32_t C[4][16 * 16];

// C tile t = A x B from zero, stored to C[t - 4]: the int kernel's pattern for one unit. A macro,
// since the tile intrinsics take their tile numbers as literal tokens.
#define PRODUCT(t)           \
  _tile_zero(t);             \
  _tile_dpbssd(t, 0, 1);     \
  _tile_stored(t, C[(t) - 4], 64)

alignas(64) double SUM[16][64];
alignas(64) float SUM32[16][64];
double STEP[16];
float STEP32[16];

// The exact epilogue of one unit (16 positions x 4 vectors of 16 outputs, from C): each product
// of 8 converted dot products and the power-of-two step, with its alpha, to add(r, k, product,
// alpha), which sums it into float64 sum k (of 8) of position r.
template <class Add>
static inline void exact_products(const __m512d (&a0)[4], const __m512d (&a1)[4], Add&& add) {
  for (int r = 0; r < 16; r++) {
    const __m512d sv = _mm512_set1_pd(STEP[r]);
    for (int v = 0; v < 4; v++) {
      const int32_t* d = C[v] + r * 16;
      add(r, 2 * v, _mm512_mul_pd(_mm512_cvtepi32_pd(_mm256_load_si256(reinterpret_cast<const __m256i*>(d))), sv), a0[v]);
      add(r, 2 * v + 1, _mm512_mul_pd(_mm512_cvtepi32_pd(_mm256_load_si256(reinterpret_cast<const __m256i*>(d + 8))), sv),
          a1[v]);
    }
  }
}

// As the kernel does it: sums in L1.
static void exact_in_l1(const __m512d (&a0)[4], const __m512d (&a1)[4]) {
  exact_products(a0, a1, [](int r, int k, __m512d product, __m512d alpha) {
    double* acc = SUM[r] + k * 8;
    _mm512_store_pd(acc, _mm512_fmadd_pd(product, alpha, _mm512_load_pd(acc)));
  });
}

// The same arithmetic into 8 float64 sums held in registers.
static void exact_in_registers(const __m512d (&a0)[4], const __m512d (&a1)[4], __m512d (&acc)[8]) {
  exact_products(a0, a1, [&](int, int k, __m512d product, __m512d alpha) { acc[k] = _mm512_fmadd_pd(product, alpha, acc[k]); });
}

// float32 sums in L1: 16 outputs per convert, multiply and fused multiply-add.
static void float32_in_l1(const __m512 (&alpha)[4]) {
  for (int r = 0; r < 16; r++) {
    const __m512 sv = _mm512_set1_ps(STEP32[r]);
    for (int v = 0; v < 4; v++) {
      const __m512 d = _mm512_cvtepi32_ps(_mm512_load_si512(C[v] + r * 16));
      float* acc = SUM32[r] + v * 16;
      _mm512_store_ps(acc, _mm512_fmadd_ps(d, _mm512_mul_ps(alpha[v], sv), _mm512_load_ps(acc)));
    }
  }
}

static double seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

int main(int argc, char** argv) {
  const long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
  if (syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) != 0) {
    std::puts("this CPU or OS does not run AMX");
    return 1;
  }
  const int K = argc > 1 ? std::atoi(argv[1]) : 32;  // channels per tdpbssd: a multiple of 4, at most 64
  if (K < 4 || K > 64 || K % 4) {
    std::puts("K: a multiple of 4 from 4 to 64");
    return 1;
  }
  TileConfig c;
  c.rows[0] = 16, c.colsb[0] = static_cast<uint16_t>(K);  // A: 16 positions x K channels
  c.rows[1] = static_cast<uint8_t>(K / 4), c.colsb[1] = 64;  // B: K / 4 rows of 16 outputs x 4 channels
  for (int t = 4; t < 8; t++) c.rows[t] = 16, c.colsb[t] = 64;  // C: 16 x 16 int32
  _tile_loadconfig(&c);
  std::memset(A, 1, sizeof A);
  std::memset(B, 1, sizeof B);
  _tile_loadd(0, A, 64);
  _tile_loadd(1, B, 64);
  const long N = 2000000;
  for (int round = 0; round < 3; round++) {
    const double t0 = seconds();
    for (long i = 0; i < N; i++) {
      _tile_dpbssd(4, 0, 1);
      _tile_dpbssd(5, 0, 1);
      _tile_dpbssd(6, 0, 1);
      _tile_dpbssd(7, 0, 1);
    }
    const double t1 = seconds();
    for (long i = 0; i < N; i++) _tile_dpbssd(4, 0, 1);
    const double t2 = seconds();
    for (long i = 0; i < N; i++) {
      PRODUCT(4);
      PRODUCT(5);
      PRODUCT(6);
      PRODUCT(7);
    }
    const double t3 = seconds();
    for (long i = 0; i < N; i++) {
      _tile_stored(4, C[0], 64);
      _tile_stored(5, C[1], 64);
      _tile_stored(6, C[2], 64);
      _tile_stored(7, C[3], 64);
    }
    const double t4 = seconds();
    std::printf(
        "K=%d  tdpbssd: %.1f ns (4 independent), %.1f ns (dependent)  zero+tdpbssd+tilestored: %.1f ns  "
        "tilestored: %.1f ns\n",
        K, (t1 - t0) / N / 4 * 1e9, (t2 - t1) / N * 1e9, (t3 - t2) / N / 4 * 1e9, (t4 - t3) / N / 4 * 1e9);
  }
  _tile_release();
  for (int r = 0; r < 16; r++) STEP[r] = STEP32[r] = 1.0f / (1 << (r % 5));
  __m512d a0[4], a1[4], acc[8];
  __m512 alpha[4];
  for (int v = 0; v < 4; v++) {
    a0[v] = _mm512_set1_pd(1e-3 * (v + 1)), a1[v] = _mm512_set1_pd(2e-3 * (v + 1));
    alpha[v] = _mm512_set1_ps(1e-3f * (v + 1));
  }
  for (int i = 0; i < 8; i++) acc[i] = _mm512_setzero_pd();
  const long M = 100000;  // units; each 16 positions x 64 outputs = 64 groups of 16 outputs
  for (int round = 0; round < 3; round++) {
    const double t0 = seconds();
    for (long i = 0; i < M; i++) {
      exact_in_l1(a0, a1);
      asm volatile("" ::: "memory");  // C is read again every unit
    }
    const double t1 = seconds();
    for (long i = 0; i < M; i++) {
      exact_in_registers(a0, a1, acc);
      asm volatile("" ::: "memory");
    }
    const double t2 = seconds();
    for (long i = 0; i < M; i++) {
      float32_in_l1(alpha);
      asm volatile("" ::: "memory");
    }
    const double t3 = seconds();
    std::printf("epilogue per 16 outputs: exact %.2f ns, exact with sums in registers %.2f ns, float32 %.2f ns\n",
                (t1 - t0) / M / 64 * 1e9, (t2 - t1) / M / 64 * 1e9, (t3 - t2) / M / 64 * 1e9);
  }
  for (int i = 0; i < 8; i++) _mm512_store_pd(SUM[15] + i * 8, _mm512_add_pd(acc[i], _mm512_load_pd(SUM[15] + i * 8)));
  // the products and sums reach memory (and the loops are not optimised away)
  return C[3][5] == 0 || SUM[15][0] == 0 || SUM32[15][0] == 0;
}
