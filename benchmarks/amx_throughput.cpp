// What one AMX-INT8 tile instruction costs here, one thread: the floor under the int kernel's AMX
// tiles (docs/integer-backend.md, "What limits int-fused"). With block scales every unit of 32
// channels needs its own tdpbssd (half its 64-channel depth) and its own tilestored, where an int8
// conv with one scale per output channel sums its whole reduction in the tile and stores once.
// Times, in ns per instruction, three rounds each, for units of K channels:
//   - tdpbssd on four independent C tiles (throughput), and on one (latency);
//   - tilezero + tdpbssd + tilestored, on four C tiles in turn (the kernel's pattern);
//   - tilestored alone.
//
//   g++ -O2 -mamx-tile -mamx-int8 benchmarks/amx_throughput.cpp -o /tmp/amx_throughput
//   /tmp/amx_throughput 32 && /tmp/amx_throughput 64      # Linux, a CPU with AMX-INT8
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
  return C[3][5] == 0;  // the products reach memory (and the loops are not optimised away)
}
