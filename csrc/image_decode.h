// JPEG (libjpeg-turbo) and PNG (libpng) decoding, either to a full RGB image or fused with a crop
// box + antialiased resize straight into an output slot. Failures are returned as reason strings.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "resample.h"

namespace bmclip {

enum class ImageFormat { kUnknown, kJpeg, kPng, kGif, kBmp, kTiff, kWebp };

ImageFormat sniff_format(const uint8_t* data, size_t size);
const char* format_name(ImageFormat f);

// Header-only probe. Returns "" on success, else the reason.
std::string probe_image(const uint8_t* data, size_t size, int* width, int* height, ImageFormat* fmt);

// kFit: the whole image resized to exactly fit_w x fit_h (the caller keeps the aspect ratio); the
// output is fit_h rows of fit_w pixels instead of size x size.
enum class Augment { kRandomResizedCrop, kCenter, kFit };

struct CropParams {
  Augment augment = Augment::kRandomResizedCrop;
  double scale_min = 0.9, scale_max = 1.0;
  double ratio_min = 3.0 / 4.0, ratio_max = 4.0 / 3.0;
  Filter filter = Filter::kBicubic;
  int64_t max_pixels = 178956970;  // Pillow's decompression-bomb error threshold
  bool dct_scaling = true;          // JPEG: decode at a reduced DCT scale when the crop allows
  // The reduced scale must keep >= dct_min_ratio decoded pixels per output pixel across the crop,
  // so that the final antialiased resize (not the DCT's box-like reduction) sets the passband.
  double dct_min_ratio = 2.0;
  int fit_w = 0, fit_h = 0;  // Augment::kFit output size
};

// A deterministic per-sample generator (splitmix64 stream).
struct SampleRng {
  uint64_t state;
  explicit SampleRng(uint64_t seed, uint64_t index);
  uint64_t next();
  double uniform(double lo, double hi);        // [lo, hi)
  int64_t randint(int64_t lo, int64_t hi);     // [lo, hi]
};

// What to resize: the input window [win_x, win_x + win_w) x [win_y, win_y + win_h) (original
// pixels) is resized to full_w x full_h, and the size x size output starts at (off_x, off_y) of that.
// RandomResizedCrop: window = the crop, full = size, off = 0 (torchvision crops, then resizes, so
// the kernel never reads outside the crop). Eval: window = whole image, full = shorter side -> size.
struct CropBox {
  int win_x, win_y, win_w, win_h;
  int full_w, full_h, off_x, off_y;
};

// torchvision RandomResizedCrop.get_params (10 attempts, then the clamped-ratio centre crop), or
// open_clip's eval transform (Resize(size) on the shorter side, CenterCrop(size)).
CropBox choose_crop(int width, int height, int size, const CropParams& p, SampleRng* rng);

// Decodes `data` and writes the size x size x 3 crop to `dst` (row stride `dst_stride`). Returns ""
// on success, else a short reason ("jpeg: premature end of data", "unknown image format", ...).
std::string decode_crop_resize(const uint8_t* data, size_t size, int out_size, const CropParams& p,
                               SampleRng* rng, uint8_t* dst, int64_t dst_stride,
                               CropBox* used_box = nullptr, int* dct_scale = nullptr);

// Dataset-builder transcode of a YCbCr (any chroma sampling) or greyscale JPEG to a tw x th JPEG:
// decoded as planes at the smallest 1/8, 2/8, 4/8 or 8/8 DCT scale still >= the target (no colour
// conversion, chroma never upsampled), each plane resized with Pillow's antialiased bilinear filter
// (the luma plane to tw x th, chroma straight to the 4:2:0 grid), then encoded from the planes
// (baseline, 4:2:0, `quality`, no optimised Huffman tables). `luma` receives the resized luma plane
// (th x tw), i.e. the stored image's greyscale for fingerprints. Returns "" on success, a reason on a
// bad image, or kTranscodeUnsupported for sources it does not handle (CMYK/YCCK, other component
// counts): those take the RGB path.
struct Transcoded {
  std::string jpeg;
  std::vector<uint8_t> luma;
  int width = 0, height = 0, dct_scale = 8;
};
extern const char* const kTranscodeUnsupported;
std::string transcode_jpeg(const uint8_t* data, size_t size, int tw, int th, int quality, int64_t max_pixels,
                           Transcoded* out);

// Full-size RGB decode into `out` (height * width * 3).
std::string decode_full(const uint8_t* data, size_t size, int64_t max_pixels, std::vector<uint8_t>* out,
                        int* width, int* height);

}  // namespace bmclip
