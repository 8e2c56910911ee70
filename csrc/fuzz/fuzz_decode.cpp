// libFuzzer target for the JPEG/PNG decoders, the fused crop+resize and the planar JPEG transcode. The
// first two bytes pick the parameters (augment, filter, DCT scaling, output size); the rest is the image.
#include <cstdint>
#include <cstdlib>
#include <vector>

#include "image_decode.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 2) return 0;
  const uint8_t a = data[0], b = data[1];
  data += 2;
  size -= 2;
  bmclip::CropParams p;
  p.augment = (a & 1) ? bmclip::Augment::kCenter : bmclip::Augment::kRandomResizedCrop;
  p.filter = (a & 2) ? bmclip::Filter::kBilinear : bmclip::Filter::kBicubic;
  p.dct_scaling = (a & 4) != 0;
  p.dct_min_ratio = (a & 8) ? 1.0 : 2.0;
  p.max_pixels = 1 << 22;  // keeps iterations fast; the guard itself is exercised by large headers
  int out_size = 1 + (b & 63);
  int out_w = out_size, out_h = out_size;
  if (a & 16) {  // whole-image fit (Decoder.decode_fit): out_w x out_h instead of a square
    p.augment = bmclip::Augment::kFit;
    p.fit_w = out_w = 1 + (b & 31);
    p.fit_h = out_h = 1 + ((b >> 2) & 31);
    out_size = 0;
  }
  std::vector<uint8_t> out(static_cast<size_t>(out_w) * out_h * 3);
  bmclip::SampleRng rng(b, a);
  std::string r = bmclip::decode_crop_resize(data, size, out_size, p, &rng, out.data(), out_w * 3);
  if (r.empty()) {
    volatile uint8_t sink = out.back();
    (void)sink;
  }
  int w = 0, h = 0;
  bmclip::ImageFormat fmt;
  std::string probe = bmclip::probe_image(data, size, &w, &h, &fmt);
  if (probe.empty() && (w <= 0 || h <= 0)) abort();
  std::vector<uint8_t> full;
  int fw = 0, fh = 0;
  std::string rf = bmclip::decode_full(data, size, 1 << 22, &full, &fw, &fh);
  if (rf.empty() && full.size() != static_cast<size_t>(fw) * fh * 3) abort();
  // the dataset builder's planar transcode (any target size, 1..64 x 1..64)
  bmclip::Transcoded t;
  const int tw = 1 + (b & 63), th = 1 + ((a >> 2) & 63);
  std::string rt = bmclip::transcode_jpeg(data, size, tw, th, 1 + (a % 100), 1 << 22, &t);
  if (rt.empty() && (t.luma.size() != static_cast<size_t>(tw) * th || t.jpeg.size() < 4)) abort();
  return 0;
}
