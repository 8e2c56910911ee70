#include "resample.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <stdexcept>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define BMCLIP_X86 1
#endif

namespace bmclip {
namespace {

constexpr int kPrecisionBits = 32 - 8 - 2;

// The AVX2 horizontal pass has two forms: across output pixels (one gather per tap for 8 outputs;
// cost grows with taps x 3 channels) for short filters, i.e. mild downscaling as in the dataset
// builder's resize to 512 px, and across taps (4 taps x 3 channels per madd pair, one reduction per
// output) for long filters, i.e. strong downscaling as in the loader's 224 px crops. Crossover
// measured on the dev VM: ksize 9 (bicubic 2:1) gather 30% faster, ksize 17 (bicubic ~4:1) madd 10%.
constexpr int kGatherMaxTaps = 12;

double bilinear_filter(double x) {
  if (x < 0.0) x = -x;
  return x < 1.0 ? 1.0 - x : 0.0;
}

double bicubic_filter(double x) {
  constexpr double a = -0.5;  // Pillow's (and Keys') choice
  if (x < 0.0) x = -x;
  if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
  if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
  return 0.0;
}

inline uint8_t clip8(int32_t v) {
  // Pillow: clip8_lookups[v >> PRECISION_BITS] (arithmetic shift, then clamp to 0..255).
  int32_t s = v >> kPrecisionBits;
  return static_cast<uint8_t>(s < 0 ? 0 : (s > 255 ? 255 : s));
}

}  // namespace

static std::atomic<bool> g_simd{true};
void set_simd_enabled(bool on) { g_simd.store(on); }
bool simd_enabled() { return g_simd.load(); }

AxisCoeffs compute_axis_coeffs(int in_size, float in0, float in1, int out_full, int out_offset,
                               int count, Filter filter, int base) {
  double (*fn)(double) = filter == Filter::kBicubic ? bicubic_filter : bilinear_filter;
  double fsupport = filter == Filter::kBicubic ? 2.0 : 1.0;
  AxisCoeffs c;
  double scale = static_cast<double>(in1 - in0) / out_full;  // float subtraction, as in Pillow
  double filterscale = scale < 1.0 ? 1.0 : scale;
  double support = fsupport * filterscale;
  c.ksize = static_cast<int>(std::ceil(support)) * 2 + 1;
  c.count = count;
  c.bounds.assign(static_cast<size_t>(count) * 2, 0);
  c.k.assign(static_cast<size_t>(count) * c.ksize, 0);
  std::vector<double> w(c.ksize);
  c.need_min = in_size;
  c.need_max = 0;
  double ss = 1.0 / filterscale;
  for (int i = 0; i < count; ++i) {
    int xx = out_offset + i;
    double center = in0 + (xx + 0.5) * scale;
    int xmin = static_cast<int>(center - support + 0.5);
    if (xmin < 0) xmin = 0;
    int xmax = static_cast<int>(center + support + 0.5);
    if (xmax > in_size) xmax = in_size;
    xmax -= xmin;
    if (xmax < 0) xmax = 0;
    if (xmax > c.ksize) xmax = c.ksize;  // cannot happen for finite inputs; keeps writes in bounds
    double ww = 0.0;
    for (int x = 0; x < xmax; ++x) {
      w[x] = fn((x + xmin - center + 0.5) * ss);
      ww += w[x];
    }
    int32_t* k = &c.k[static_cast<size_t>(i) * c.ksize];
    for (int x = 0; x < xmax; ++x) {
      double v = ww != 0.0 ? w[x] / ww : w[x];
      k[x] = v < 0 ? static_cast<int32_t>(-0.5 + v * (1 << kPrecisionBits))
                   : static_cast<int32_t>(0.5 + v * (1 << kPrecisionBits));
    }
    c.bounds[2 * i] = xmin + base;
    c.bounds[2 * i + 1] = xmax;
    if (xmax > 0) {
      c.need_min = std::min(c.need_min, xmin);
      c.need_max = std::max(c.need_max, xmin + xmax);
    }
  }
  if (c.need_max <= c.need_min) {  // degenerate (empty input): read nothing
    c.need_min = 0;
    c.need_max = 0;
  }
  c.need_min += base;
  c.need_max += base;
  return c;
}

#ifdef BMCLIP_X86
namespace {
bool cpu_has_avx2();
}  // namespace
#endif

RowResampler::RowResampler(const AxisCoeffs* xs, const AxisCoeffs* ys, int src_x0, bool use_simd, int channels)
    : xs_(xs), ys_(ys), src_x0_(src_x0), use_simd_(use_simd), channels_(channels) {
  if (channels != 1 && channels != 3) throw std::invalid_argument("RowResampler: channels must be 1 or 3");
#ifdef BMCLIP_X86
  if (use_simd_ && cpu_has_avx2() && channels == 1) {
    // Coefficients for hpass1_madd (split kh / kl, int16, 0 past the last tap): per pair of outputs
    // (A, B) and group of 8 taps, 32 values [khA khB klA klB] (8 each).
    groups_ = (xs->ksize + 7) / 8;
    khl_.assign((static_cast<size_t>(xs->count) / 2 + 1) * groups_ * 32, 0);
    for (int xx = 0; xx < xs->count; ++xx) {
      const int n = xs->bounds[2 * xx + 1];
      const int32_t* k = &xs->k[static_cast<size_t>(xx) * xs->ksize];
      int16_t* base = &khl_[static_cast<size_t>(xx / 2) * groups_ * 32 + 8 * (xx % 2)];
      for (int t = 0; t < n; ++t) {
        base[32 * (t / 8) + t % 8] = static_cast<int16_t>(k[t] >> 11);
        base[32 * (t / 8) + 16 + t % 8] = static_cast<int16_t>(k[t] & 2047);
      }
    }
  } else if (use_simd_ && cpu_has_avx2() && channels == 3 && xs->ksize > kGatherMaxTaps) {
    // Coefficients for hpass_avx2_madd: per output pixel and group of 4 taps, kh0..kh3 then kl0..kl3
    // (int16; zeros past the last tap).
    groups_ = (xs->ksize + 3) / 4;
    khl_.assign(static_cast<size_t>(xs->count) * groups_ * 8, 0);
    for (int xx = 0; xx < xs->count; ++xx) {
      const int n = xs->bounds[2 * xx + 1];
      const int32_t* k = &xs->k[static_cast<size_t>(xx) * xs->ksize];
      int16_t* dst = &khl_[static_cast<size_t>(xx) * groups_ * 8];
      for (int t = 0; t < n; ++t) {
        dst[(t / 4) * 8 + t % 4] = static_cast<int16_t>(k[t] >> 11);
        dst[(t / 4) * 8 + 4 + t % 4] = static_cast<int16_t>(k[t] & 2047);
      }
    }
  } else if (use_simd_ && cpu_has_avx2()) {
    // Transposed tables for hpass_avx2_gather (see there). Lanes past the last output pixel and taps
    // past a pixel's own count read that block's first valid pixel with coefficient 0, so every
    // gathered address stays inside the row.
    const int blocks = (xs->count + 7) / 8;
    const int ks = xs->ksize;
    goff_.assign(static_cast<size_t>(blocks) * ks * 8, 0);
    gk_.assign(static_cast<size_t>(blocks) * ks * 8, 0);
    taps_.assign(blocks, 0);
    for (int b = 0; b < blocks; ++b) {
      const int first = b * 8;
      const int safe = xs->count > 0 ? (xs->bounds[2 * first] - src_x0) * channels : 0;
      int taps = 0;
      for (int l = 0; l < 8; ++l) {
        const int xx = first + l;
        if (xx < xs->count) taps = std::max(taps, xs->bounds[2 * xx + 1]);
      }
      taps_[b] = taps;
      for (int t = 0; t < ks; ++t) {
        for (int l = 0; l < 8; ++l) {
          const int xx = first + l;
          const size_t at = (static_cast<size_t>(b) * ks + t) * 8 + l;
          if (xx < xs->count && t < xs->bounds[2 * xx + 1]) {
            goff_[at] = (xs->bounds[2 * xx] + t - src_x0) * channels;
            gk_[at] = xs->k[static_cast<size_t>(xx) * ks + t];
          } else {
            goff_[at] = safe;
          }
        }
      }
    }
  }
#endif
  size_t rows = static_cast<size_t>(ys->need_max - ys->need_min);
  tmp_.assign(rows * xs->count * channels + kRowPad, 0);
  have_.assign(rows, 0);
}

namespace {

// One output row of the horizontal pass (scalar; the reference for the SIMD version).
void hpass_scalar(const uint8_t* rgb, int src_x0, const AxisCoeffs& xs, uint8_t* out) {
  const int ksize = xs.ksize;
  const int32_t half = 1 << (kPrecisionBits - 1);
  for (int xx = 0; xx < xs.count; ++xx) {
    const int xmin = xs.bounds[2 * xx];
    const int n = xs.bounds[2 * xx + 1];
    const int32_t* k = &xs.k[static_cast<size_t>(xx) * ksize];
    const uint8_t* p = rgb + static_cast<ptrdiff_t>(xmin - src_x0) * 3;
    int32_t s0 = half, s1 = half, s2 = half;
    for (int x = 0; x < n; ++x) {
      s0 += p[3 * x] * k[x];
      s1 += p[3 * x + 1] * k[x];
      s2 += p[3 * x + 2] * k[x];
    }
    out[3 * xx] = clip8(s0);
    out[3 * xx + 1] = clip8(s1);
    out[3 * xx + 2] = clip8(s2);
  }
}

// One output row of the horizontal pass over a single 8-bit plane (scalar; reference for the SIMD one).
void hpass1_scalar(const uint8_t* row, int src_x0, const AxisCoeffs& xs, uint8_t* out) {
  const int ksize = xs.ksize;
  const int32_t half = 1 << (kPrecisionBits - 1);
  for (int xx = 0; xx < xs.count; ++xx) {
    const int n = xs.bounds[2 * xx + 1];
    const int32_t* k = &xs.k[static_cast<size_t>(xx) * ksize];
    const uint8_t* p = row + (xs.bounds[2 * xx] - src_x0);
    int32_t s0 = half;
    for (int x = 0; x < n; ++x) s0 += p[x] * k[x];
    out[xx] = clip8(s0);
  }
}

void vpass_scalar(const uint8_t* tmp, size_t row_len, int need_min, const AxisCoeffs& ys, int yy,
                  int32_t* acc, uint8_t* o) {
  const int32_t half = 1 << (kPrecisionBits - 1);
  const int ymin = ys.bounds[2 * yy];
  const int n = ys.bounds[2 * yy + 1];
  const int32_t* k = &ys.k[static_cast<size_t>(yy) * ys.ksize];
  std::fill(acc, acc + row_len, half);
  for (int y = 0; y < n; ++y) {
    const uint8_t* src = tmp + static_cast<size_t>(ymin + y - need_min) * row_len;
    const int32_t ky = k[y];
    for (size_t i = 0; i < row_len; ++i) acc[i] += src[i] * ky;
  }
  for (size_t i = 0; i < row_len; ++i) o[i] = clip8(acc[i]);
}

#ifdef BMCLIP_X86
// Exact AVX2 horizontal pass: each 22-bit coefficient k is split as k = kh * 2^11 + kl (0 <= kl <
// 2^11), so both halves fit int16 and _mm256_madd_epi16 can be used; the two int32 sums recombine
// exactly to the sum of p * k. Four taps per step: pixels x..x+3 are spread to int16 lanes
// [r0 r1 g0 g1 b0 b1 0 0 | r2 r3 g2 g3 b2 b3 0 0] and multiplied by the broadcast pairs
// (kh0 kh1 | kh2 kh3), likewise for kl. The compact table (16 bytes per 4 taps: kh0..3, kl0..3)
// stays in L1 for a whole row.
__attribute__((target("avx2"))) void hpass_avx2_madd(const uint8_t* rgb, int src_x0, const AxisCoeffs& xs,
                                                     const std::vector<int16_t>& khl, int groups,
                                                     uint8_t* out) {
  const __m256i spread = _mm256_setr_epi8(0, -1, 3, -1, 1, -1, 4, -1, 2, -1, 5, -1, -1, -1, -1, -1,  //
                                          6, -1, 9, -1, 7, -1, 10, -1, 8, -1, 11, -1, -1, -1, -1, -1);
  const __m256i sel_hi = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
  const __m256i sel_lo = _mm256_setr_epi32(2, 2, 2, 2, 3, 3, 3, 3);
  const __m128i half = _mm_set1_epi32(1 << (kPrecisionBits - 1));
  for (int xx = 0; xx < xs.count; ++xx) {
    const int xmin = xs.bounds[2 * xx];
    const int n = xs.bounds[2 * xx + 1];
    const int16_t* k = &khl[static_cast<size_t>(xx) * groups * 8];
    const uint8_t* p = rgb + static_cast<ptrdiff_t>(xmin - src_x0) * 3;
    __m256i acc_hi = _mm256_setzero_si256(), acc_lo = _mm256_setzero_si256();
    const int ng = (n + 3) / 4;
    for (int g = 0; g < ng; ++g) {
      __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 12 * g));
      __m256i px = _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(raw), spread);
      __m256i kk = _mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(k + 8 * g)));
      acc_hi = _mm256_add_epi32(acc_hi, _mm256_madd_epi16(px, _mm256_permutevar8x32_epi32(kk, sel_hi)));
      acc_lo = _mm256_add_epi32(acc_lo, _mm256_madd_epi16(px, _mm256_permutevar8x32_epi32(kk, sel_lo)));
    }
    __m256i acc = _mm256_add_epi32(_mm256_slli_epi32(acc_hi, 11), acc_lo);
    __m128i sum = _mm_add_epi32(_mm_add_epi32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1)), half);
    __m128i r = _mm_srai_epi32(sum, kPrecisionBits);
    r = _mm_packus_epi16(_mm_packs_epi32(r, r), r);
    int32_t bytes = _mm_cvtsi128_si32(r);
    memcpy(out + 3 * xx, &bytes, 3);
  }
}

// Exact AVX2 horizontal pass, vectorised across output pixels: for a block of 8 output pixels and
// each tap, one gather fetches the 4 bytes (R, G, B, next R) of the 8 input pixels, and the three
// channels are multiplied by the taps' 22-bit coefficients in int32 (255 * 2^22 and the sums fit
// int32, as in Pillow's own int arithmetic), so the result equals the scalar pass bit for bit. No
// per-pixel horizontal reduction is needed; the 8 RGB results are interleaved with two byte shuffles.
// Reads at most 1 byte past the last pixel of the row (rows are kRowPad-padded).
__attribute__((target("avx2"))) void hpass_avx2_gather(const uint8_t* rgb, int count, const int32_t* goff,
                                                       const int32_t* gk, const int* taps, int ksize,
                                                       uint8_t* out) {
  const __m256i half = _mm256_set1_epi32(1 << (kPrecisionBits - 1));
  const __m256i m8 = _mm256_set1_epi32(0xFF);
  // [r0..r7 g0..g7] and [b0..b7 ...] -> RGB-interleaved bytes 0..15 and 16..23.
  const __m128i sa0 = _mm_setr_epi8(0, 8, -1, 1, 9, -1, 2, 10, -1, 3, 11, -1, 4, 12, -1, 5);
  const __m128i sb0 = _mm_setr_epi8(-1, -1, 0, -1, -1, 1, -1, -1, 2, -1, -1, 3, -1, -1, 4, -1);
  const __m128i sa1 = _mm_setr_epi8(13, -1, 6, 14, -1, 7, 15, -1, -1, -1, -1, -1, -1, -1, -1, -1);
  const __m128i sb1 = _mm_setr_epi8(-1, 5, -1, -1, 6, -1, -1, 7, -1, -1, -1, -1, -1, -1, -1, -1);
  const int blocks = (count + 7) / 8;
  for (int b = 0; b < blocks; ++b) {
    const int32_t* off = goff + static_cast<size_t>(b) * ksize * 8;
    const int32_t* kk = gk + static_cast<size_t>(b) * ksize * 8;
    __m256i ar = half, ag = half, ab = half;
    for (int t = 0; t < taps[b]; ++t) {
      const __m256i idx = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(off + 8 * t));
      const __m256i k = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kk + 8 * t));
      const __m256i v = _mm256_i32gather_epi32(reinterpret_cast<const int*>(rgb), idx, 1);
      ar = _mm256_add_epi32(ar, _mm256_mullo_epi32(_mm256_and_si256(v, m8), k));
      ag = _mm256_add_epi32(ag, _mm256_mullo_epi32(_mm256_and_si256(_mm256_srli_epi32(v, 8), m8), k));
      ab = _mm256_add_epi32(ab, _mm256_mullo_epi32(_mm256_and_si256(_mm256_srli_epi32(v, 16), m8), k));
    }
    ar = _mm256_srai_epi32(ar, kPrecisionBits);
    ag = _mm256_srai_epi32(ag, kPrecisionBits);
    ab = _mm256_srai_epi32(ab, kPrecisionBits);
    // int32 -> saturated uint8 (= clip8): [r0..7 g0..7] and [b0..7]
    const __m256i rg16 = _mm256_permute4x64_epi64(_mm256_packs_epi32(ar, ag), 0xD8);  // r0..7 | g0..7
    const __m128i rg = _mm_packus_epi16(_mm256_castsi256_si128(rg16), _mm256_extracti128_si256(rg16, 1));
    const __m256i bb16 = _mm256_permute4x64_epi64(_mm256_packs_epi32(ab, ab), 0xD8);
    const __m128i bb = _mm_packus_epi16(_mm256_castsi256_si128(bb16), _mm256_castsi256_si128(bb16));
    const __m128i lo = _mm_or_si128(_mm_shuffle_epi8(rg, sa0), _mm_shuffle_epi8(bb, sb0));
    const __m128i hi = _mm_or_si128(_mm_shuffle_epi8(rg, sa1), _mm_shuffle_epi8(bb, sb1));
    uint8_t* o = out + static_cast<size_t>(b) * 24;
    const int left = count - b * 8;
    if (left >= 8) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(o), lo);
      _mm_storel_epi64(reinterpret_cast<__m128i*>(o + 16), hi);
    } else {  // last, partial block: never write past this row
      alignas(16) uint8_t tail[32];
      _mm_store_si128(reinterpret_cast<__m128i*>(tail), lo);
      _mm_storel_epi64(reinterpret_cast<__m128i*>(tail + 16), hi);
      memcpy(o, tail, static_cast<size_t>(left) * 3);
    }
  }
}

__attribute__((target("avx2"))) void vpass_avx2(const uint8_t* tmp, size_t row_len, int need_min,
                                                const AxisCoeffs& ys, int yy, int32_t* acc, uint8_t* o) {
  const int ymin = ys.bounds[2 * yy];
  const int n = ys.bounds[2 * yy + 1];
  const int32_t* k = &ys.k[static_cast<size_t>(yy) * ys.ksize];
  const __m256i half = _mm256_set1_epi32(1 << (kPrecisionBits - 1));
  size_t i = 0;
  for (; i + 16 <= row_len; i += 16) {
    __m256i a0 = half, a1 = half;
    for (int y = 0; y < n; ++y) {
      const uint8_t* src = tmp + static_cast<size_t>(ymin + y - need_min) * row_len + i;
      __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
      __m256i ky = _mm256_set1_epi32(k[y]);
      a0 = _mm256_add_epi32(a0, _mm256_mullo_epi32(_mm256_cvtepu8_epi32(b), ky));
      a1 = _mm256_add_epi32(a1, _mm256_mullo_epi32(_mm256_cvtepu8_epi32(_mm_srli_si128(b, 8)), ky));
    }
    a0 = _mm256_srai_epi32(a0, kPrecisionBits);
    a1 = _mm256_srai_epi32(a1, kPrecisionBits);
    // packs/packus work within 128-bit lanes: reorder so the 16 bytes come out in order.
    __m256i w = _mm256_permute4x64_epi64(_mm256_packs_epi32(a0, a1), 0xD8);
    __m128i b16 = _mm_packus_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(o + i), b16);
  }
  if (i < row_len) {
    const int32_t h = 1 << (kPrecisionBits - 1);
    for (size_t j = i; j < row_len; ++j) acc[j] = h;
    for (int y = 0; y < n; ++y) {
      const uint8_t* src = tmp + static_cast<size_t>(ymin + y - need_min) * row_len;
      const int32_t ky = k[y];
      for (size_t j = i; j < row_len; ++j) acc[j] += src[j] * ky;
    }
    for (size_t j = i; j < row_len; ++j) o[j] = clip8(acc[j]);
  }
}

// Single-plane horizontal pass: taps are contiguous bytes, so 8 of them are one 8-byte load widened to
// int16 and multiplied by the split coefficients (k = kh * 2^11 + kl, as in hpass_avx2_madd) with two
// madds; exact like the scalar pass. (No gathers: they are slow on CPUs with the GDS mitigation.)
// Two outputs share a 256-bit register (A's 8 taps | B's 8 taps); 8 outputs are reduced together with
// three hadds. Table: per pair of outputs and group of 8 taps, 32 int16 [khA khB klA klB]. Reads up
// to 7 bytes past a pixel's last tap: rows are kRowPad-padded.
__attribute__((target("avx2"))) inline __m256i hpass1_pair(const uint8_t* row, int src_x0, const AxisCoeffs& xs,
                                                           const int16_t* k, int groups, int xx) {
  const uint8_t* pa = row + (xs.bounds[2 * xx] - src_x0);
  const uint8_t* pb = row + (xs.bounds[2 * xx + 2] - src_x0);
  const int16_t* kp = k + static_cast<size_t>(xx / 2) * groups * 32;
  __m256i acc = _mm256_setzero_si256();
  for (int g = 0; g < groups; ++g) {
    const __m128i a = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(pa + 8 * g));
    const __m128i ab = _mm_castpd_si128(_mm_loadh_pd(_mm_castsi128_pd(a), reinterpret_cast<const double*>(pb + 8 * g)));
    const __m256i px = _mm256_cvtepu8_epi16(ab);  // [A taps 8g..8g+7 | B taps 8g..8g+7]
    const __m256i kh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kp + 32 * g));
    const __m256i kl = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kp + 32 * g + 16));
    acc = _mm256_add_epi32(acc, _mm256_add_epi32(_mm256_slli_epi32(_mm256_madd_epi16(px, kh), 11),
                                                 _mm256_madd_epi16(px, kl)));
  }
  return acc;
}

__attribute__((target("avx2"))) void hpass1_madd(const uint8_t* row, int src_x0, const AxisCoeffs& xs,
                                                 const std::vector<int16_t>& khl, int groups, uint8_t* out) {
  const int16_t* k = khl.data();
  const __m256i half = _mm256_set1_epi32(1 << (kPrecisionBits - 1));
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  int xx = 0;
  for (; xx + 8 <= xs.count; xx += 8) {
    const __m256i v0 = hpass1_pair(row, src_x0, xs, k, groups, xx);
    const __m256i v1 = hpass1_pair(row, src_x0, xs, k, groups, xx + 2);
    const __m256i v2 = hpass1_pair(row, src_x0, xs, k, groups, xx + 4);
    const __m256i v3 = hpass1_pair(row, src_x0, xs, k, groups, xx + 6);
    // [A C E G | B D F H] -> [A B C D E F G H]
    __m256i sum = _mm256_hadd_epi32(_mm256_hadd_epi32(v0, v1), _mm256_hadd_epi32(v2, v3));
    sum = _mm256_permutevar8x32_epi32(sum, order);
    sum = _mm256_srai_epi32(_mm256_add_epi32(sum, half), kPrecisionBits);
    const __m256i w = _mm256_permute4x64_epi64(_mm256_packs_epi32(sum, sum), 0xD8);
    const __m128i b8 = _mm_packus_epi16(_mm256_castsi256_si128(w), _mm256_castsi256_si128(w));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(out + xx), b8);
  }
  for (; xx < xs.count; ++xx) {  // the last < 8 outputs: one at a time (its pair's half of the table)
    const int n = xs.bounds[2 * xx + 1];
    const uint8_t* p = row + (xs.bounds[2 * xx] - src_x0);
    const int16_t* kp = k + static_cast<size_t>(xx / 2) * groups * 32 + 8 * (xx % 2);
    __m128i acc = _mm_setzero_si128();
    for (int g = 0; g < (n + 7) / 8; ++g) {
      const __m128i px = _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8 * g)));
      const __m128i kh = _mm_loadu_si128(reinterpret_cast<const __m128i*>(kp + 32 * g));
      const __m128i kl = _mm_loadu_si128(reinterpret_cast<const __m128i*>(kp + 32 * g + 16));
      acc = _mm_add_epi32(acc, _mm_add_epi32(_mm_slli_epi32(_mm_madd_epi16(px, kh), 11), _mm_madd_epi16(px, kl)));
    }
    acc = _mm_add_epi32(acc, _mm_shuffle_epi32(acc, 0x4E));
    acc = _mm_add_epi32(acc, _mm_shuffle_epi32(acc, 0xB1));
    out[xx] = clip8(_mm_cvtsi128_si32(acc) + (1 << (kPrecisionBits - 1)));
  }
}

bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2");
  return has;
}
#endif

}  // namespace

void RowResampler::push_row(int y, const uint8_t* rgb) {
  if (y < ys_->need_min || y >= ys_->need_max) return;
  uint8_t* out = &tmp_[static_cast<size_t>(y - ys_->need_min) * xs_->count * channels_];
  if (channels_ == 1) {
#ifdef BMCLIP_X86
    if (use_simd_ && cpu_has_avx2()) {
      hpass1_madd(rgb, src_x0_, *xs_, khl_, groups_, out);
      have_[y - ys_->need_min] = 1;
      return;
    }
#endif
    hpass1_scalar(rgb, src_x0_, *xs_, out);
    have_[y - ys_->need_min] = 1;
    return;
  }
#ifdef BMCLIP_X86
  if (use_simd_ && cpu_has_avx2()) {
    if (groups_ > 0)
      hpass_avx2_madd(rgb, src_x0_, *xs_, khl_, groups_, out);
    else
      hpass_avx2_gather(rgb, xs_->count, goff_.data(), gk_.data(), taps_.data(), xs_->ksize, out);
    have_[y - ys_->need_min] = 1;
    return;
  }
#endif
  hpass_scalar(rgb, src_x0_, *xs_, out);
  have_[y - ys_->need_min] = 1;
}

bool RowResampler::finish(uint8_t* dst, int64_t dst_stride) {
  for (uint8_t h : have_)
    if (!h) return false;
  const size_t row_len = static_cast<size_t>(xs_->count) * channels_;
  std::vector<int32_t> acc(row_len);
  for (int yy = 0; yy < ys_->count; ++yy) {
    uint8_t* o = dst + yy * dst_stride;
#ifdef BMCLIP_X86
    if (use_simd_ && cpu_has_avx2()) {
      vpass_avx2(tmp_.data(), row_len, ys_->need_min, *ys_, yy, acc.data(), o);
      continue;
    }
#endif
    vpass_scalar(tmp_.data(), row_len, ys_->need_min, *ys_, yy, acc.data(), o);
  }
  return true;
}

}  // namespace bmclip
