// libjpeg and libpng report errors through longjmp. Each decoder keeps its C++ objects (vectors,
// coefficient tables, the resampler) in a context struct owned by the caller's frame, so a longjmp
// out of the library never skips a destructor: the setjmp frames hold only plain data.
#include "image_decode.h"

#include <algorithm>
#include <cmath>
#include <csetjmp>
#include <cstdio>
#include <cstring>
#include <memory>
#include <new>

#include <jpeglib.h>
#include <jerror.h>
#include <png.h>

namespace bmclip {

// ----------------------------------------------------------------------------------------------
// Format sniffing

ImageFormat sniff_format(const uint8_t* d, size_t n) {
  if (n >= 3 && d[0] == 0xFF && d[1] == 0xD8 && d[2] == 0xFF) return ImageFormat::kJpeg;
  static const uint8_t png_sig[8] = {0x89, 'P', 'N', 'G', 0x0D, 0x0A, 0x1A, 0x0A};
  if (n >= 8 && memcmp(d, png_sig, 8) == 0) return ImageFormat::kPng;
  if (n >= 6 && (memcmp(d, "GIF87a", 6) == 0 || memcmp(d, "GIF89a", 6) == 0)) return ImageFormat::kGif;
  if (n >= 2 && d[0] == 'B' && d[1] == 'M') return ImageFormat::kBmp;
  if (n >= 4 && (memcmp(d, "II*\0", 4) == 0 || memcmp(d, "MM\0*", 4) == 0)) return ImageFormat::kTiff;
  if (n >= 12 && memcmp(d, "RIFF", 4) == 0 && memcmp(d + 8, "WEBP", 4) == 0) return ImageFormat::kWebp;
  return ImageFormat::kUnknown;
}

const char* format_name(ImageFormat f) {
  switch (f) {
    case ImageFormat::kJpeg: return "jpeg";
    case ImageFormat::kPng: return "png";
    case ImageFormat::kGif: return "gif";
    case ImageFormat::kBmp: return "bmp";
    case ImageFormat::kTiff: return "tiff";
    case ImageFormat::kWebp: return "webp";
    default: return "unknown";
  }
}

static std::string unsupported(ImageFormat f) {
  if (f == ImageFormat::kUnknown) return "unknown image format";
  return std::string("unsupported image format: ") + format_name(f);
}

// ----------------------------------------------------------------------------------------------
// Random numbers and crop boxes

static uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

SampleRng::SampleRng(uint64_t seed, uint64_t index)
    : state(splitmix64(seed ^ splitmix64(index ^ 0x5851F42D4C957F2Dull))) {}

uint64_t SampleRng::next() {
  state += 0x9E3779B97F4A7C15ull;
  uint64_t z = state;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

double SampleRng::uniform(double lo, double hi) {
  return lo + (hi - lo) * (static_cast<double>(next() >> 11) * 0x1.0p-53);
}

int64_t SampleRng::randint(int64_t lo, int64_t hi) {
  uint64_t span = static_cast<uint64_t>(hi - lo) + 1;
  return lo + static_cast<int64_t>(next() % span);  // bias < span / 2^64: negligible
}

CropBox choose_crop(int width, int height, int size, const CropParams& p, SampleRng* rng) {
  CropBox b{};
  if (p.augment == Augment::kFit) {
    b.win_x = 0;
    b.win_y = 0;
    b.win_w = width;
    b.win_h = height;
    b.full_w = p.fit_w;
    b.full_h = p.fit_h;
    b.off_x = 0;
    b.off_y = 0;
    return b;
  }
  if (p.augment == Augment::kCenter) {
    // torchvision Resize(size) on the shorter side: long = int(size * long / short).
    bool w_short = width <= height;
    int64_t shortside = w_short ? width : height, longside = w_short ? height : width;
    int new_long = static_cast<int>(static_cast<double>(size * longside) / static_cast<double>(shortside));
    int new_w = w_short ? size : new_long, new_h = w_short ? new_long : size;
    b.win_x = 0;
    b.win_y = 0;
    b.win_w = width;
    b.win_h = height;
    b.full_w = new_w;
    b.full_h = new_h;
    // CenterCrop: int(round((h - size) / 2.0)) with Python's round-half-to-even.
    b.off_x = static_cast<int>(std::nearbyint((new_w - size) / 2.0));
    b.off_y = static_cast<int>(std::nearbyint((new_h - size) / 2.0));
    return b;
  }
  // torchvision RandomResizedCrop.get_params
  double area = static_cast<double>(width) * height;
  double lr0 = std::log(p.ratio_min), lr1 = std::log(p.ratio_max);
  int64_t i = -1, j = -1, h = 0, w = 0;
  for (int attempt = 0; attempt < 10; ++attempt) {
    double target = area * rng->uniform(p.scale_min, p.scale_max);
    double ar = std::exp(rng->uniform(lr0, lr1));
    int64_t cw = static_cast<int64_t>(std::nearbyint(std::sqrt(target * ar)));
    int64_t ch = static_cast<int64_t>(std::nearbyint(std::sqrt(target / ar)));
    if (cw > 0 && cw <= width && ch > 0 && ch <= height) {
      i = rng->randint(0, height - ch);
      j = rng->randint(0, width - cw);
      h = ch;
      w = cw;
      break;
    }
  }
  if (i < 0) {
    double in_ratio = static_cast<double>(width) / height;
    double rmin = std::min(p.ratio_min, p.ratio_max), rmax = std::max(p.ratio_min, p.ratio_max);
    if (in_ratio < rmin) {
      w = width;
      h = static_cast<int64_t>(std::nearbyint(w / rmin));
    } else if (in_ratio > rmax) {
      h = height;
      w = static_cast<int64_t>(std::nearbyint(h * rmax));
    } else {
      w = width;
      h = height;
    }
    i = (height - h) / 2;
    j = (width - w) / 2;
  }
  b.win_x = static_cast<int>(j);
  b.win_y = static_cast<int>(i);
  b.win_w = static_cast<int>(w);
  b.win_h = static_cast<int>(h);
  b.full_w = size;
  b.full_h = size;
  b.off_x = 0;
  b.off_y = 0;
  return b;
}

// ----------------------------------------------------------------------------------------------
// JPEG

namespace {

constexpr int kMaxJpegScans = 500;  // same guard as TurboJPEG's TJFLAG_LIMITSCANS

struct JpegErr {
  jpeg_error_mgr pub;
  jmp_buf jb;
  char msg[JMSG_LENGTH_MAX + 32];
};

[[noreturn]] void jpeg_on_error(j_common_ptr c) {
  JpegErr* e = reinterpret_cast<JpegErr*>(c->err);
  char buf[JMSG_LENGTH_MAX];
  (*c->err->format_message)(c, buf);
  snprintf(e->msg, sizeof(e->msg), "%s", buf);
  longjmp(e->jb, 1);
}

// libjpeg warnings that mean the pixel data is damaged: libjpeg goes on and fills the rest of the
// scan with grey (a marker inside the entropy-coded data) or with blocks decoded out of step (a bad
// code, bytes left over before a marker, a missing restart marker). Pillow ignores these and hands out
// the garbage; a training sample built from it is worse than a counted skip.
bool jpeg_warning_is_corrupt_data(int code) {
  switch (code) {
    case JWRN_HIT_MARKER:
    case JWRN_HUFF_BAD_CODE:
    case JWRN_ARITH_BAD_CODE:
    case JWRN_EXTRANEOUS_DATA:
    case JWRN_MUST_RESYNC:
      return true;
    default:  // JWRN_ADOBE_XFORM, JWRN_JFIF_MAJOR, JWRN_BOGUS_ICC, JWRN_NOT_SEQUENTIAL, ...: pixels intact
      return false;
  }
}

void jpeg_on_message(j_common_ptr c, int level) {
  if (level >= 0) return;  // trace messages
  JpegErr* e = reinterpret_cast<JpegErr*>(c->err);
  // A truncated file is only a warning for libjpeg (it pads with an EOI and returns grey rows);
  // for training data that is a broken sample.
  if (c->err->msg_code == JWRN_JPEG_EOF) {
    snprintf(e->msg, sizeof(e->msg), "premature end of data");
    longjmp(e->jb, 1);
  }
  if (jpeg_warning_is_corrupt_data(c->err->msg_code)) {
    char buf[JMSG_LENGTH_MAX];
    (*c->err->format_message)(c, buf);  // "Corrupt JPEG data: ..."
    snprintf(e->msg, sizeof(e->msg), "%s", buf);
    longjmp(e->jb, 1);
  }
  c->err->num_warnings++;  // benign warnings (metadata): decode what is there, like Pillow
}

void jpeg_silent(j_common_ptr) {}

struct JpegProgress {
  jpeg_progress_mgr pub;
  JpegErr* err;
};

void jpeg_on_progress(j_common_ptr c) {
  if (!c->is_decompressor) return;
  j_decompress_ptr d = reinterpret_cast<j_decompress_ptr>(c);
  if (d->progressive_mode && d->input_scan_number > kMaxJpegScans) {
    JpegErr* e = reinterpret_cast<JpegProgress*>(c->progress)->err;
    snprintf(e->msg, sizeof(e->msg), "more than %d progressive scans", kMaxJpegScans);
    longjmp(e->jb, 1);
  }
}

// The error and progress managers of every libjpeg object here: errors longjmp to err->jb with the message
// in err->msg, a truncated file is an error, a runaway progressive file is refused.
jpeg_error_mgr* init_jpeg_errors(JpegErr* err, JpegProgress* prog) {
  jpeg_std_error(&err->pub);
  err->pub.error_exit = jpeg_on_error;
  err->pub.emit_message = jpeg_on_message;
  err->pub.output_message = jpeg_silent;
  err->msg[0] = 0;
  prog->pub.progress_monitor = jpeg_on_progress;
  prog->err = err;
  return &err->pub;
}

inline uint8_t muldiv255(int a, int b) {
  int t = a * b + 128;
  return static_cast<uint8_t>(((t >> 8) + t) >> 8);
}

// libjpeg returns Adobe-style inverted CMYK; Pillow reads it as "CMYK;I" and converts with
// R = (255 - C) * (255 - K) / 255 in its integer form, which this reproduces bit for bit.
void cmyk_to_rgb(const uint8_t* in, uint8_t* out, int n) {
  for (int x = 0; x < n; ++x) {
    int c = in[4 * x], m = in[4 * x + 1], y = in[4 * x + 2], k = in[4 * x + 3];
    out[3 * x] = static_cast<uint8_t>(k - muldiv255(255 - c, k));
    out[3 * x + 1] = static_cast<uint8_t>(k - muldiv255(255 - m, k));
    out[3 * x + 2] = static_cast<uint8_t>(k - muldiv255(255 - y, k));
  }
}

enum class Mode { kProbe, kFull, kCrop };

// Output pixels per axis: size x size for the crops, the whole fitted image for Augment::kFit.
int out_count_x(const CropBox& b, const CropParams& p, int out_size) {
  return p.augment == Augment::kFit ? b.full_w : out_size;
}
int out_count_y(const CropBox& b, const CropParams& p, int out_size) {
  return p.augment == Augment::kFit ? b.full_h : out_size;
}

// What both decoders are asked to do and what they report back (init_ctx / probe_with / crop_with /
// full_with fill and read these fields for either format).
struct DecodeCtx {
  Mode mode;
  const uint8_t* data;
  size_t size;
  int64_t max_pixels;
  // crop mode
  int out_size = 0;
  const CropParams* params = nullptr;
  SampleRng* rng = nullptr;
  // results / owned buffers
  int width = 0, height = 0;
  CropBox box{};
  AxisCoeffs xs, ys;
  std::unique_ptr<RowResampler> resampler;
  std::vector<uint8_t>* full = nullptr;  // full mode: the RGB image
  std::string reason;
};

struct JpegCtx : DecodeCtx {
  int dct_scale = 8;
  std::vector<uint8_t> row, rgb;
};

void prepare_crop(JpegCtx& ctx, jpeg_decompress_struct& cinfo) {
  ctx.box = choose_crop(ctx.width, ctx.height, ctx.out_size, *ctx.params, ctx.rng);
  int s = 8;
  if (ctx.params->dct_scaling) {
    // Smallest DCT scale s/8 keeping >= dct_min_ratio decoded pixels per output pixel. Only 1/8,
    // 2/8, 4/8 have SIMD reduced IDCTs in libjpeg-turbo, and on real PMC figures they also keep
    // PSNR vs Pillow's full-resolution resize well above 40 dB at ratio 2 (3/8, 5/8, 6/8 and 7/8
    // did not: ~40 dB worst case), so odd scales are not used.
    double span_x = ctx.box.win_w;
    double span_y = ctx.box.win_h;
    for (int c = 1; c <= 8; c *= 2) {
      const double r = ctx.params->dct_min_ratio;
      if (span_x * c / 8.0 >= r * ctx.box.full_w && span_y * c / 8.0 >= r * ctx.box.full_h) {
        s = c;
        break;
      }
    }
  }
  ctx.dct_scale = s;
  cinfo.scale_num = static_cast<unsigned>(s);
  cinfo.scale_denom = 8;
}

void axis_coeffs_scaled(AxisCoeffs* c, int scaled_size, int win0, int win_len, int s, int full, int off,
                        int count, Filter filter) {
  const double f = s / 8.0;
  int lo = static_cast<int>(std::floor(win0 * f));
  int hi = std::min(scaled_size, static_cast<int>(std::ceil((win0 + win_len) * f)));
  if (hi <= lo) hi = std::min(scaled_size, lo + 1);
  float in0 = static_cast<float>(win0 * f - lo);
  float in1 = static_cast<float>(in0 + win_len * f);
  *c = compute_axis_coeffs(hi - lo, in0, in1, full, off, count, filter, lo);
}

bool jpeg_run(JpegCtx& ctx) {
  jpeg_decompress_struct cinfo;
  JpegErr err;
  JpegProgress prog;
  memset(&cinfo, 0, sizeof(cinfo));
  cinfo.err = init_jpeg_errors(&err, &prog);
  if (setjmp(err.jb)) {
    jpeg_destroy_decompress(&cinfo);
    ctx.reason = std::string("jpeg: ") + err.msg;
    return false;
  }
  jpeg_create_decompress(&cinfo);
  cinfo.progress = &prog.pub;
  jpeg_mem_src(&cinfo, ctx.data, static_cast<unsigned long>(ctx.size));
  jpeg_read_header(&cinfo, TRUE);
  ctx.width = static_cast<int>(cinfo.image_width);
  ctx.height = static_cast<int>(cinfo.image_height);
  if (ctx.mode == Mode::kProbe) {
    jpeg_destroy_decompress(&cinfo);
    return true;
  }
  if (static_cast<int64_t>(ctx.width) * ctx.height > ctx.max_pixels) {
    jpeg_destroy_decompress(&cinfo);
    ctx.reason = "image too large: " + std::to_string(ctx.width) + "x" + std::to_string(ctx.height) +
                 " pixels > limit " + std::to_string(ctx.max_pixels);
    return false;
  }
  bool cmyk = cinfo.jpeg_color_space == JCS_CMYK || cinfo.jpeg_color_space == JCS_YCCK;
  cinfo.out_color_space = cmyk ? JCS_CMYK : JCS_RGB;
  cinfo.dct_method = JDCT_ISLOW;  // Pillow's default: bit-identical pixels at full scale
  cinfo.do_fancy_upsampling = TRUE;
  if (ctx.mode == Mode::kCrop) prepare_crop(ctx, cinfo);
  jpeg_start_decompress(&cinfo);
  const int ow = static_cast<int>(cinfo.output_width), oh = static_cast<int>(cinfo.output_height);
  const int comps = cinfo.output_components;

  if (ctx.mode == Mode::kFull) {
    ctx.full->resize(static_cast<size_t>(ow) * oh * 3);
    ctx.row.resize(static_cast<size_t>(ow) * comps);
    while (cinfo.output_scanline < cinfo.output_height) {
      uint8_t* out = ctx.full->data() + static_cast<size_t>(cinfo.output_scanline) * ow * 3;
      JSAMPROW rp = cmyk ? ctx.row.data() : out;
      jpeg_read_scanlines(&cinfo, &rp, 1);
      if (cmyk) cmyk_to_rgb(ctx.row.data(), out, ow);
    }
    jpeg_finish_decompress(&cinfo);
    jpeg_destroy_decompress(&cinfo);
    return true;
  }

  // Crop mode: map the window into the DCT-scaled image (exactly s/8 of the original coordinates;
  // at s = 8 this is the identity and the result is bit-identical to Pillow).
  axis_coeffs_scaled(&ctx.xs, ow, ctx.box.win_x, ctx.box.win_w, ctx.dct_scale, ctx.box.full_w,
                     ctx.box.off_x, out_count_x(ctx.box, *ctx.params, ctx.out_size), ctx.params->filter);
  axis_coeffs_scaled(&ctx.ys, oh, ctx.box.win_y, ctx.box.win_h, ctx.dct_scale, ctx.box.full_h,
                     ctx.box.off_y, out_count_y(ctx.box, *ctx.params, ctx.out_size), ctx.params->filter);
  // Column crop: libjpeg treats the edges of a cropped region as image edges when it upsamples
  // chroma, so the region is padded by one iMCU on each side to keep the needed columns exact.
  const int imcu = cinfo.max_h_samp_factor * cinfo.min_DCT_scaled_size;
  const int cx0 = std::max(0, ctx.xs.need_min - imcu);
  const int cx1 = std::min(ow, ctx.xs.need_max + imcu);
  JDIMENSION xoff = static_cast<JDIMENSION>(cx0);
  JDIMENSION cw = static_cast<JDIMENSION>(cx1 - cx0);
  if (cx1 > cx0 && cw < cinfo.output_width) jpeg_crop_scanline(&cinfo, &xoff, &cw);  // aligns to iMCUs
  else xoff = 0;
  const int rw = static_cast<int>(cinfo.output_width);
  ctx.resampler = std::make_unique<RowResampler>(&ctx.xs, &ctx.ys, static_cast<int>(xoff));
  ctx.row.resize(static_cast<size_t>(rw) * comps + kRowPad);
  if (cmyk) ctx.rgb.resize(static_cast<size_t>(rw) * 3 + kRowPad);
  const JDIMENSION y0 = static_cast<JDIMENSION>(ctx.ys.need_min);
  const JDIMENSION y1 = static_cast<JDIMENSION>(ctx.ys.need_max);
  if (y0 > 0) jpeg_skip_scanlines(&cinfo, y0);
  while (cinfo.output_scanline < y1) {
    JSAMPROW rp = ctx.row.data();
    int y = static_cast<int>(cinfo.output_scanline);
    if (jpeg_read_scanlines(&cinfo, &rp, 1) != 1) break;
    if (cmyk) {
      cmyk_to_rgb(ctx.row.data(), ctx.rgb.data(), rw);
      ctx.resampler->push_row(y, ctx.rgb.data());
    } else {
      ctx.resampler->push_row(y, ctx.row.data());
    }
  }
  // The rest of the stream is still read, so that damage or truncation anywhere in the file fails the
  // sample whatever the crop (a verdict that does not depend on the random crop). Rows past the crop
  // are only entropy-decoded: skipping to the very bottom would not read them at all (libjpeg marks
  // the input finished), so skip to the last row and read that one.
  const JDIMENSION last = cinfo.output_height - 1;
  if (cinfo.output_scanline < last) jpeg_skip_scanlines(&cinfo, last - cinfo.output_scanline);
  if (cinfo.output_scanline < cinfo.output_height) {
    JSAMPROW rp = ctx.row.data();
    jpeg_read_scanlines(&cinfo, &rp, 1);
  }
  jpeg_finish_decompress(&cinfo);  // reads up to EOI: markers after the last scan are checked too
  jpeg_destroy_decompress(&cinfo);
  return true;
}

// ----------------------------------------------------------------------------------------------
// PNG

struct PngCtx : DecodeCtx {
  size_t pos = 0;  // read position in data
  std::vector<uint8_t> row, image, wide;  // wide: a 16-bit greyscale image before its min/max scaling
  std::vector<png_bytep> rows;
  char msg[256] = {0};
};

void png_on_error(png_structp png, png_const_charp m) {
  PngCtx* ctx = static_cast<PngCtx*>(png_get_error_ptr(png));
  snprintf(ctx->msg, sizeof(ctx->msg), "%s", m);
  png_longjmp(png, 1);
}

// libpng warnings that mean damaged data: a chunk whose CRC does not match (libpng only warns for
// ancillary chunks) and zlib failures it reports as benign (e.g. the Adler-32 check at the end of
// the image data). Pillow refuses both. Other warnings (e.g. a known-incorrect sRGB profile, extra
// compressed data after the image) leave the pixels intact and are ignored, as Pillow does.
bool png_warning_is_corrupt_data(const char* m) {
  return strstr(m, "CRC error") != nullptr || strstr(m, "incorrect data check") != nullptr ||
         strstr(m, "invalid distance") != nullptr || strstr(m, "invalid code") != nullptr ||
         strstr(m, "invalid block type") != nullptr || strstr(m, "invalid stored block") != nullptr ||
         strstr(m, "invalid literal") != nullptr || strstr(m, "Not enough image data") != nullptr;
}

void png_on_warning(png_structp png, png_const_charp m) {
  if (!png_warning_is_corrupt_data(m)) return;
  PngCtx* ctx = static_cast<PngCtx*>(png_get_error_ptr(png));
  snprintf(ctx->msg, sizeof(ctx->msg), "%s", m);
  png_longjmp(png, 1);
}

void png_read_mem(png_structp png, png_bytep out, size_t n) {
  PngCtx* ctx = static_cast<PngCtx*>(png_get_io_ptr(png));
  if (n > ctx->size - ctx->pos) png_error(png, "premature end of data");
  memcpy(out, ctx->data + ctx->pos, n);
  ctx->pos += n;
}

// 16-bit greyscale (big-endian samples, W x H) -> 8-bit RGB with the minimum at 0 and the maximum at 255, as
// bmclip.data.images.minmax_to_uint8 computes it (the same float64 operations, rounded half to even by
// nearbyint), so every reader of a 16-bit CT or microscopy PNG sees the same pixels; a constant image is black.
void gray16_to_rgb(const uint8_t* wide, size_t n, uint8_t* out) {
  unsigned lo = 65535, hi = 0;
  for (size_t i = 0; i < n; ++i) {
    const unsigned v = (static_cast<unsigned>(wide[2 * i]) << 8) | wide[2 * i + 1];
    lo = std::min(lo, v);
    hi = std::max(hi, v);
  }
  uint8_t lut[65536];
  if (hi <= lo) {
    memset(out, 0, n * 3);
    return;
  }
  for (unsigned v = lo; v <= hi; ++v) {
    const double t = std::nearbyint((static_cast<double>(v) - lo) / (static_cast<double>(hi) - lo) * 255.0);
    lut[v] = static_cast<uint8_t>(std::min(255.0, std::max(0.0, t)));
  }
  for (size_t i = 0; i < n; ++i) {
    const uint8_t g = lut[(static_cast<unsigned>(wide[2 * i]) << 8) | wide[2 * i + 1]];
    out[3 * i] = out[3 * i + 1] = out[3 * i + 2] = g;
  }
}

// Stage 1 (setjmp frame): header, transforms to 8-bit RGB like Pillow's convert("RGB") (alpha
// dropped, palette expanded, gray replicated, 16-bit colour -> high byte; 16-bit greyscale min/max scaled as
// bmclip's Python readers do, where Pillow would clip it), then rows.
bool png_run(PngCtx& ctx) {
  png_structp png = png_create_read_struct(PNG_LIBPNG_VER_STRING, &ctx, png_on_error, png_on_warning);
  if (!png) {
    ctx.reason = "png: out of memory";
    return false;
  }
  png_infop info = png_create_info_struct(png);
  if (!info) {
    png_destroy_read_struct(&png, nullptr, nullptr);
    ctx.reason = "png: out of memory";
    return false;
  }
  if (setjmp(png_jmpbuf(png))) {
    png_destroy_read_struct(&png, &info, nullptr);
    ctx.reason = std::string("png: ") + ctx.msg;
    return false;
  }
  png_set_read_fn(png, &ctx, png_read_mem);
  png_read_info(png, info);
  ctx.width = static_cast<int>(png_get_image_width(png, info));
  ctx.height = static_cast<int>(png_get_image_height(png, info));
  if (ctx.mode == Mode::kProbe) {
    png_destroy_read_struct(&png, &info, nullptr);
    return true;
  }
  if (static_cast<int64_t>(ctx.width) * ctx.height > ctx.max_pixels) {
    png_destroy_read_struct(&png, &info, nullptr);
    ctx.reason = "image too large: " + std::to_string(ctx.width) + "x" + std::to_string(ctx.height) +
                 " pixels > limit " + std::to_string(ctx.max_pixels);
    return false;
  }
  int color = png_get_color_type(png, info);
  int depth = png_get_bit_depth(png, info);
  if (color == PNG_COLOR_TYPE_PALETTE) png_set_palette_to_rgb(png);
  if ((color == PNG_COLOR_TYPE_GRAY || color == PNG_COLOR_TYPE_GRAY_ALPHA) && depth < 8)
    png_set_expand_gray_1_2_4_to_8(png);
  // 16-bit greyscale needs its minimum and maximum before any row is converted: read whole, then scaled.
  const bool gray16 = color == PNG_COLOR_TYPE_GRAY && depth == 16;
  if (depth == 16 && !gray16) png_set_strip_16(png);
  // Alpha (and palette tRNS, which png_set_palette_to_rgb expands to alpha) is dropped, as in
  // Pillow's convert("RGB").
  if ((color & PNG_COLOR_MASK_ALPHA) || png_get_valid(png, info, PNG_INFO_tRNS)) png_set_strip_alpha(png);
  if (!gray16 && (color == PNG_COLOR_TYPE_GRAY || color == PNG_COLOR_TYPE_GRAY_ALPHA)) png_set_gray_to_rgb(png);
  int passes = png_set_interlace_handling(png);
  png_read_update_info(png, info);
  const size_t rowbytes = png_get_rowbytes(png, info);
  const size_t W = static_cast<size_t>(ctx.width), H = static_cast<size_t>(ctx.height);
  const size_t channels = gray16 ? 1 : 3, sample_bytes = gray16 ? 2 : 1;
  if (rowbytes != W * channels * sample_bytes || png_get_channels(png, info) != channels ||
      png_get_bit_depth(png, info) != 8 * sample_bytes) {
    png_destroy_read_struct(&png, &info, nullptr);
    ctx.reason = "png: unsupported pixel layout";
    return false;
  }

  if (gray16) {
    ctx.wide.resize(W * H * 2);
    ctx.rows.resize(H);
    for (size_t y = 0; y < H; ++y) ctx.rows[y] = ctx.wide.data() + y * W * 2;
    png_read_image(png, ctx.rows.data());
    png_destroy_read_struct(&png, &info, nullptr);
    std::vector<uint8_t>& img = ctx.mode == Mode::kFull ? *ctx.full : ctx.image;
    img.resize(W * H * 3 + (ctx.mode == Mode::kFull ? 0 : kRowPad));
    gray16_to_rgb(ctx.wide.data(), W * H, img.data());
    std::vector<uint8_t>().swap(ctx.wide);
    if (ctx.mode == Mode::kFull) return true;
    passes = 2;  // from here on, as an interlaced image: every row is in ctx.image
  } else if (ctx.mode == Mode::kFull || passes > 1) {
    // Interlaced images only have final rows after the last pass: decode the whole image.
    std::vector<uint8_t>& img = ctx.mode == Mode::kFull ? *ctx.full : ctx.image;
    img.resize(W * H * 3 + (ctx.mode == Mode::kFull ? 0 : kRowPad));
    ctx.rows.resize(H);
    for (size_t y = 0; y < H; ++y) ctx.rows[y] = img.data() + y * W * 3;
    png_read_image(png, ctx.rows.data());
    png_destroy_read_struct(&png, &info, nullptr);
    if (ctx.mode == Mode::kFull) return true;
  }

  ctx.box = choose_crop(ctx.width, ctx.height, ctx.out_size, *ctx.params, ctx.rng);
  axis_coeffs_scaled(&ctx.xs, ctx.width, ctx.box.win_x, ctx.box.win_w, 8, ctx.box.full_w, ctx.box.off_x,
                     out_count_x(ctx.box, *ctx.params, ctx.out_size), ctx.params->filter);
  axis_coeffs_scaled(&ctx.ys, ctx.height, ctx.box.win_y, ctx.box.win_h, 8, ctx.box.full_h, ctx.box.off_y,
                     out_count_y(ctx.box, *ctx.params, ctx.out_size), ctx.params->filter);
  ctx.resampler = std::make_unique<RowResampler>(&ctx.xs, &ctx.ys, 0);
  if (passes > 1) {
    for (int y = ctx.ys.need_min; y < ctx.ys.need_max; ++y)
      ctx.resampler->push_row(y, ctx.image.data() + static_cast<size_t>(y) * W * 3);
    return true;
  }
  ctx.row.resize(W * 3 + kRowPad);
  for (int y = 0; y < ctx.ys.need_max; ++y) {
    png_read_row(png, ctx.row.data(), nullptr);
    ctx.resampler->push_row(y, ctx.row.data());
  }
  // The remaining rows are read (not resampled) so that damage anywhere in the image data, including
  // the zlib checksum after the last row, fails the sample whatever the crop.
  for (int y = ctx.ys.need_max; y < ctx.height; ++y) png_read_row(png, ctx.row.data(), nullptr);
  png_destroy_read_struct(&png, &info, nullptr);
  return true;
}

// ----------------------------------------------------------------------------------------------
// Planar JPEG -> JPEG transcode (dataset builder)

// One 8-bit plane with padding: `stride` >= the encoder's block-padded width, `rows` >= padded height.
// The storage is kept between calls (the planes are thread_local in transcode_run) and not zeroed:
// every byte a reader uses is written first (libjpeg fills the decoded planes, pad_edges the padding
// of the resized ones; taps past a pixel's count read padding with coefficient 0).
struct Plane {
  int w = 0, h = 0, stride = 0, rows = 0;
  std::unique_ptr<uint8_t[]> buf;
  size_t cap = 0;
  void alloc(int width, int height, int stride_, int rows_) {
    w = width;
    h = height;
    stride = stride_;
    rows = rows_;
    const size_t need = static_cast<size_t>(stride) * rows + kRowPad;
    if (need > cap) {
      buf.reset(new uint8_t[need]);
      cap = need;
    }
  }
  // Release storage far above what this call needs (one huge image must not pin memory forever).
  void trim(size_t keep) {
    if (cap > keep) {
      buf.reset();
      cap = 0;
    }
  }
  uint8_t* data() { return buf.get(); }
  uint8_t* row(int y) { return buf.get() + static_cast<size_t>(y) * stride; }
  void fill(uint8_t v) { memset(buf.get(), v, static_cast<size_t>(stride) * rows); }
  // Replicate the last column and row into the padding (what libjpeg's own encoder does at edges).
  void pad_edges() {
    for (int y = 0; y < h; ++y) {
      uint8_t* r = row(y);
      std::fill(r + w, r + stride, r[w - 1]);
    }
    for (int y = h; y < rows; ++y) memcpy(row(y), row(h - 1), static_cast<size_t>(stride));
  }
};

inline int round_up(int v, int m) { return (v + m - 1) / m * m; }

// Resize plane `src` (of which the first src_span_x x src_span_y input units map onto the output)
// into `dst` (dst->w x dst->h).
void resize_plane(Plane& src, double span_x, double span_y, Plane* dst) {
  AxisCoeffs xs = compute_axis_coeffs(src.w, 0.f, static_cast<float>(span_x), dst->w, 0, dst->w, Filter::kBilinear);
  AxisCoeffs ys = compute_axis_coeffs(src.h, 0.f, static_cast<float>(span_y), dst->h, 0, dst->h, Filter::kBilinear);
  RowResampler rs(&xs, &ys, 0, simd_enabled(), 1);
  for (int y = rs.first_row(); y < rs.end_row(); ++y) rs.push_row(y, src.row(y));
  rs.finish(dst->data(), dst->stride);
}

struct JpegDest {
  unsigned char* buf = nullptr;
  unsigned long size = 0;
  ~JpegDest() { free(buf); }
};

std::string transcode_run(const uint8_t* data, size_t size, int tw, int th, int quality, int64_t max_pixels,
                          Transcoded* out) {
  jpeg_decompress_struct cinfo;
  jpeg_compress_struct cc;
  JpegErr err;
  JpegProgress prog;
  JpegDest dest;
  // Everything with a destructor lives above setjmp, so that a libjpeg error (longjmp) skips none.
  // The planes are reused by this thread's next call (no allocation, no page faults per image).
  thread_local Plane src[3], dst[3];
  constexpr size_t kKeepBytes = size_t{64} << 20;
  for (int i = 0; i < 3; ++i) {
    src[i].trim(kKeepBytes);
    dst[i].trim(kKeepBytes);
  }
  std::vector<JSAMPROW> ptrs[3];
  // volatile: written after setjmp and read after a longjmp back to it
  volatile bool have_d = false, have_c = false;
  memset(&cinfo, 0, sizeof(cinfo));
  memset(&cc, 0, sizeof(cc));
  cinfo.err = init_jpeg_errors(&err, &prog);
  if (setjmp(err.jb)) {
    if (have_d) jpeg_destroy_decompress(&cinfo);
    if (have_c) jpeg_destroy_compress(&cc);
    return std::string("jpeg: ") + err.msg;
  }
  jpeg_create_decompress(&cinfo);
  have_d = true;
  cinfo.progress = &prog.pub;
  jpeg_mem_src(&cinfo, data, static_cast<unsigned long>(size));
  jpeg_read_header(&cinfo, TRUE);
  const int W = static_cast<int>(cinfo.image_width), H = static_cast<int>(cinfo.image_height);
  out->width = W;
  out->height = H;
  if (static_cast<int64_t>(W) * H > max_pixels) {
    jpeg_destroy_decompress(&cinfo);
    return "image too large: " + std::to_string(W) + "x" + std::to_string(H) + " pixels > limit " +
           std::to_string(max_pixels);
  }
  const int nc = cinfo.num_components;
  const bool ycc = nc == 3 && cinfo.jpeg_color_space == JCS_YCbCr;
  const bool grey = nc == 1 && cinfo.jpeg_color_space == JCS_GRAYSCALE;
  if (!ycc && !grey) {
    jpeg_destroy_decompress(&cinfo);
    return kTranscodeUnsupported;
  }
  int s = 8;  // smallest DCT scale whose image still covers the target (decode_fit's rule, ratio 1)
  for (int c = 1; c <= 8; c *= 2) {
    if (W * c / 8.0 >= tw && H * c / 8.0 >= th) {
      s = c;
      break;
    }
  }
  out->dct_scale = s;
  cinfo.scale_num = static_cast<unsigned>(s);
  cinfo.scale_denom = 8;
  cinfo.raw_data_out = TRUE;
  cinfo.dct_method = JDCT_ISLOW;
  jpeg_start_decompress(&cinfo);
  // Decode every component plane whole (iMCU row by iMCU row).
  const int lines = cinfo.max_v_samp_factor * cinfo.min_DCT_scaled_size;
  for (int ci = 0; ci < nc; ++ci) {
    jpeg_component_info* comp = &cinfo.comp_info[ci];
    const int ds = comp->DCT_scaled_size;
    src[ci].alloc(static_cast<int>(comp->downsampled_width), static_cast<int>(comp->downsampled_height),
                  static_cast<int>(comp->width_in_blocks + cinfo.max_h_samp_factor) * ds,
                  static_cast<int>(cinfo.total_iMCU_rows) * comp->v_samp_factor * ds);
  }
  JSAMPARRAY arrays[3];
  for (JDIMENSION imcu = 0; cinfo.output_scanline < cinfo.output_height; ++imcu) {
    for (int ci = 0; ci < nc; ++ci) {
      const int per = cinfo.comp_info[ci].v_samp_factor * cinfo.comp_info[ci].DCT_scaled_size;
      ptrs[ci].resize(per);
      for (int k = 0; k < per; ++k) ptrs[ci][k] = src[ci].row(static_cast<int>(imcu) * per + k);
      arrays[ci] = ptrs[ci].data();
    }
    if (jpeg_read_raw_data(&cinfo, arrays, static_cast<JDIMENSION>(lines)) == 0) {
      jpeg_destroy_decompress(&cinfo);
      have_d = false;
      return "jpeg: image data ended early";
    }
  }
  // The part of each plane that holds the image, in (fractional) samples: downsampled_width before its
  // ceil. Chroma may be decoded at a larger DCT size than luma (libjpeg scales it up in the IDCT).
  double span_x[3], span_y[3];
  for (int ci = 0; ci < nc; ++ci) {
    const jpeg_component_info* comp = &cinfo.comp_info[ci];
    span_x[ci] = static_cast<double>(W) * comp->h_samp_factor * comp->DCT_scaled_size / (cinfo.max_h_samp_factor * 8.0);
    span_y[ci] = static_cast<double>(H) * comp->v_samp_factor * comp->DCT_scaled_size / (cinfo.max_v_samp_factor * 8.0);
  }
  jpeg_finish_decompress(&cinfo);
  jpeg_destroy_decompress(&cinfo);
  have_d = false;

  // Resize into the encoder's 4:2:0 layout: luma tw x th, chroma ceil(tw/2) x ceil(th/2); strides and
  // rows padded to whole MCUs (16 x 16 luma, 8 x 8 chroma).
  const int ctw = (tw + 1) / 2, cth = (th + 1) / 2;
  const int ystride = round_up(tw, 16), yrows = round_up(th, 16);
  dst[0].alloc(tw, th, ystride, yrows);
  resize_plane(src[0], span_x[0], span_y[0], &dst[0]);
  for (int ci = 1; ci < 3; ++ci) {
    dst[ci].alloc(ctw, cth, ystride / 2, yrows / 2);
    if (grey) {
      dst[ci].fill(128);
      continue;
    }
    // Output chroma pixel j covers target luma [2j, 2j + 2): the ctw pixels span 2 ctw / tw of the image.
    resize_plane(src[ci], span_x[ci] * (2.0 * ctw / tw), span_y[ci] * (2.0 * cth / th), &dst[ci]);
  }
  out->luma.resize(static_cast<size_t>(tw) * th);
  for (int y = 0; y < th; ++y) memcpy(&out->luma[static_cast<size_t>(y) * tw], dst[0].row(y), tw);
  for (auto& d : dst) d.pad_edges();

  cc.err = &err.pub;  // the same managers: an encoder error longjmps to the same frame
  jpeg_create_compress(&cc);
  have_c = true;
  jpeg_mem_dest(&cc, &dest.buf, &dest.size);
  cc.image_width = static_cast<JDIMENSION>(tw);
  cc.image_height = static_cast<JDIMENSION>(th);
  cc.input_components = 3;
  cc.in_color_space = JCS_YCbCr;
  jpeg_set_defaults(&cc);  // YCbCr, 2x2 / 1x1 / 1x1 sampling, baseline
  jpeg_set_quality(&cc, quality, TRUE);
  cc.dct_method = JDCT_ISLOW;
  cc.optimize_coding = FALSE;
  cc.raw_data_in = TRUE;
  jpeg_start_compress(&cc, TRUE);
  JSAMPROW yr[16], cbr[8], crr[8];
  JSAMPARRAY planes[3] = {yr, cbr, crr};
  while (cc.next_scanline < cc.image_height) {
    const int y0 = static_cast<int>(cc.next_scanline);
    for (int k = 0; k < 16; ++k) yr[k] = dst[0].row(y0 + k);
    for (int k = 0; k < 8; ++k) {
      cbr[k] = dst[1].row(y0 / 2 + k);
      crr[k] = dst[2].row(y0 / 2 + k);
    }
    jpeg_write_raw_data(&cc, planes, 16);
  }
  jpeg_finish_compress(&cc);
  jpeg_destroy_compress(&cc);
  have_c = false;
  out->jpeg.assign(reinterpret_cast<const char*>(dest.buf), dest.size);
  return "";
}

// The steps every entry point takes with either decoder, written once for both context types.
int used_dct_scale(const JpegCtx& c) { return c.dct_scale; }
int used_dct_scale(const PngCtx&) { return 8; }

template <class Ctx>
void init_ctx(Ctx& ctx, Mode mode, const uint8_t* data, size_t size, int64_t max_pixels) {
  ctx.mode = mode;
  ctx.data = data;
  ctx.size = size;
  ctx.max_pixels = max_pixels;
}

template <class Ctx>
std::string probe_with(bool (*run)(Ctx&), const uint8_t* data, size_t size, int* width, int* height) {
  Ctx ctx{};
  init_ctx(ctx, Mode::kProbe, data, size, 0);
  if (!run(ctx)) return ctx.reason;
  *width = ctx.width;
  *height = ctx.height;
  return "";
}

template <class Ctx>
std::string crop_with(bool (*run)(Ctx&), const char* name, const uint8_t* data, size_t size, int out_size,
                      const CropParams& p, SampleRng* rng, uint8_t* dst, int64_t dst_stride, CropBox* used_box,
                      int* dct_scale) {
  Ctx ctx{};
  init_ctx(ctx, Mode::kCrop, data, size, p.max_pixels);
  ctx.out_size = out_size;
  ctx.params = &p;
  ctx.rng = rng;
  if (!run(ctx)) return ctx.reason;
  if (!ctx.resampler->finish(dst, dst_stride)) return std::string(name) + ": image data ended early";
  if (used_box) *used_box = ctx.box;
  if (dct_scale) *dct_scale = used_dct_scale(ctx);
  return "";
}

template <class Ctx>
std::string full_with(bool (*run)(Ctx&), const uint8_t* data, size_t size, int64_t max_pixels,
                      std::vector<uint8_t>* out, int* width, int* height) {
  Ctx ctx{};
  init_ctx(ctx, Mode::kFull, data, size, max_pixels);
  ctx.full = out;
  if (!run(ctx)) return ctx.reason;
  *width = ctx.width;
  *height = ctx.height;
  return "";
}

}  // namespace

// ----------------------------------------------------------------------------------------------
// Public entry points

std::string probe_image(const uint8_t* data, size_t size, int* width, int* height, ImageFormat* fmt) {
  *fmt = sniff_format(data, size);
  if (*fmt == ImageFormat::kJpeg) return probe_with<JpegCtx>(jpeg_run, data, size, width, height);
  if (*fmt == ImageFormat::kPng) return probe_with<PngCtx>(png_run, data, size, width, height);
  return unsupported(*fmt);
}

std::string decode_crop_resize(const uint8_t* data, size_t size, int out_size, const CropParams& p,
                               SampleRng* rng, uint8_t* dst, int64_t dst_stride, CropBox* used_box,
                               int* dct_scale) {
  try {
    ImageFormat fmt = sniff_format(data, size);
    if (fmt == ImageFormat::kJpeg)
      return crop_with<JpegCtx>(jpeg_run, "jpeg", data, size, out_size, p, rng, dst, dst_stride, used_box, dct_scale);
    if (fmt == ImageFormat::kPng)
      return crop_with<PngCtx>(png_run, "png", data, size, out_size, p, rng, dst, dst_stride, used_box, dct_scale);
    return unsupported(fmt);
  } catch (const std::bad_alloc&) {
    return "out of memory";
  } catch (const std::exception& e) {
    return std::string("decode failed: ") + e.what();
  }
}

const char* const kTranscodeUnsupported = "unsupported for planar transcode";

std::string transcode_jpeg(const uint8_t* data, size_t size, int tw, int th, int quality, int64_t max_pixels,
                           Transcoded* out) {
  try {
    if (tw <= 0 || th <= 0) return "target size must be positive";
    if (quality < 1 || quality > 100) return "quality must be in 1..100";
    if (sniff_format(data, size) != ImageFormat::kJpeg) return kTranscodeUnsupported;
    return transcode_run(data, size, tw, th, quality, max_pixels, out);
  } catch (const std::bad_alloc&) {
    return "out of memory";
  } catch (const std::exception& e) {
    return std::string("transcode failed: ") + e.what();
  }
}

std::string decode_full(const uint8_t* data, size_t size, int64_t max_pixels, std::vector<uint8_t>* out,
                        int* width, int* height) {
  try {
    ImageFormat fmt = sniff_format(data, size);
    if (fmt == ImageFormat::kJpeg) return full_with<JpegCtx>(jpeg_run, data, size, max_pixels, out, width, height);
    if (fmt == ImageFormat::kPng) return full_with<PngCtx>(png_run, data, size, max_pixels, out, width, height);
    return unsupported(fmt);
  } catch (const std::bad_alloc&) {
    return "out of memory";
  } catch (const std::exception& e) {
    return std::string("decode failed: ") + e.what();
  }
}

}  // namespace bmclip
