#include "resample.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>

namespace bmclip {
namespace {

constexpr int kPrecisionBits = 32 - 8 - 2;

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

RowResampler::RowResampler(const AxisCoeffs* xs, const AxisCoeffs* ys, int src_x0)
    : xs_(xs), ys_(ys), src_x0_(src_x0) {
  size_t rows = static_cast<size_t>(ys->need_max - ys->need_min);
  tmp_.assign(rows * xs->count * 3, 0);
  have_.assign(rows, 0);
}

void RowResampler::push_row(int y, const uint8_t* rgb) {
  if (y < ys_->need_min || y >= ys_->need_max) return;
  uint8_t* out = &tmp_[static_cast<size_t>(y - ys_->need_min) * xs_->count * 3];
  const int ksize = xs_->ksize;
  const int32_t half = 1 << (kPrecisionBits - 1);
  for (int xx = 0; xx < xs_->count; ++xx) {
    const int xmin = xs_->bounds[2 * xx];
    const int n = xs_->bounds[2 * xx + 1];
    const int32_t* k = &xs_->k[static_cast<size_t>(xx) * ksize];
    const uint8_t* p = rgb + static_cast<ptrdiff_t>(xmin - src_x0_) * 3;
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
  have_[y - ys_->need_min] = 1;
}

bool RowResampler::finish(uint8_t* dst, int64_t dst_stride) {
  for (uint8_t h : have_)
    if (!h) return false;
  const int ksize = ys_->ksize;
  const int32_t half = 1 << (kPrecisionBits - 1);
  const size_t row_len = static_cast<size_t>(xs_->count) * 3;
  std::vector<int32_t> acc(row_len);
  for (int yy = 0; yy < ys_->count; ++yy) {
    const int ymin = ys_->bounds[2 * yy];
    const int n = ys_->bounds[2 * yy + 1];
    const int32_t* k = &ys_->k[static_cast<size_t>(yy) * ksize];
    std::fill(acc.begin(), acc.end(), half);
    for (int y = 0; y < n; ++y) {
      const uint8_t* src = &tmp_[static_cast<size_t>(ymin + y - ys_->need_min) * row_len];
      const int32_t ky = k[y];
      for (size_t i = 0; i < row_len; ++i) acc[i] += src[i] * ky;
    }
    uint8_t* o = dst + yy * dst_stride;
    for (size_t i = 0; i < row_len; ++i) o[i] = clip8(acc[i]);
  }
  return true;
}

}  // namespace bmclip
