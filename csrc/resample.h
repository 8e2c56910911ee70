// Antialiased separable resampling that reproduces Pillow's ImagingResample (8-bit path) exactly:
// same filter kernels and support scaling, same 22-bit fixed-point coefficients and rounding, same
// uint8 intermediate between the horizontal and the vertical pass.
#pragma once

#include <cstdint>
#include <vector>

namespace bmclip {

enum class Filter { kBilinear, kBicubic };

// Rows handed to RowResampler::push_row must stay readable for this many bytes past their last
// pixel (the SIMD path loads 8 bytes at a time).
constexpr int kRowPad = 16;

// Taps for one axis: output pixel i reads input [bounds[2i], bounds[2i] + bounds[2i+1]) with the
// fixed-point weights k[i*ksize ...].
struct AxisCoeffs {
  int ksize = 0;
  int count = 0;
  std::vector<int> bounds;
  std::vector<int32_t> k;
  int need_min = 0;  // first input pixel any output pixel reads
  int need_max = 0;  // one past the last input pixel any output pixel reads
};

// Pillow's precompute_coeffs + normalize_coeffs_8bpc for an input of `in_size` pixels (taps are
// clamped to it, as when Pillow resizes a cropped image) whose interval [in0, in1) (float32, as
// Pillow receives a box) maps onto `out_full` output pixels, of which the `count` pixels starting at
// `out_offset` are produced (a crop of the resized image, for resize+centre-crop). Tap positions
// are shifted by `base` (the input window's position in the decoded image).
AxisCoeffs compute_axis_coeffs(int in_size, float in0, float in1, int out_full, int out_offset,
                               int count, Filter filter, int base = 0);

// Process-wide switch for the SIMD code paths (tests compare them with the scalar reference).
void set_simd_enabled(bool on);
bool simd_enabled();

// Streams RGB rows of an input region through the horizontal pass (into a uint8 intermediate) and
// then runs the vertical pass into the destination. Rows outside [ys.need_min, ys.need_max) are
// not needed; `push_row` ignores them.
class RowResampler {
 public:
  // `src_x0` is the input x of the first pixel of every pushed row (decoders may deliver a
  // column window); rows must cover [xs.need_min, xs.need_max).
  // `channels`: 3 (RGB rows) or 1 (one 8-bit plane, e.g. a JPEG's Y or Cb plane).
  RowResampler(const AxisCoeffs* xs, const AxisCoeffs* ys, int src_x0, bool use_simd = simd_enabled(),
               int channels = 3);
  int first_row() const { return ys_->need_min; }
  int end_row() const { return ys_->need_max; }
  // rgb: `channels` bytes per pixel, starting at input x = src_x0, readable kRowPad bytes past the end.
  void push_row(int y, const uint8_t* rgb);
  // Writes count_y x count_x x channels bytes to dst (row stride dst_stride bytes). Returns false if some
  // needed row was never pushed (decoder stopped early).
  bool finish(uint8_t* dst, int64_t dst_stride);

 private:
  const AxisCoeffs* xs_;
  const AxisCoeffs* ys_;
  int src_x0_;
  bool use_simd_;
  int channels_;
  // AVX2 horizontal pass, 8 output pixels per step: per block of 8 outputs and tap t, the byte
  // offsets of the 8 input pixels (clamped to a valid pixel where a pixel has fewer taps) and their
  // coefficients (0 there), laid out [block][t][8]; taps_ = taps used by each block.
  std::vector<int32_t> goff_, gk_;
  std::vector<int> taps_;
  // AVX2 horizontal pass across taps (long filters): split coefficients, groups_ > 0 when used.
  std::vector<int16_t> khl_;
  int groups_ = 0;
  std::vector<uint8_t> tmp_;   // (need_max - need_min) rows x count_x x 3
  std::vector<uint8_t> have_;  // which intermediate rows were filled
};

}  // namespace bmclip
