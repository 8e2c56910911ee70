// pybind11 module bmclip._C: TarIndex (mmap'd webdataset shard index) and Decoder (threaded
// JPEG/PNG decode + fused crop/resize into a caller-provided NHWC uint8 batch).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <thread>
#include <string>
#include <vector>

#include "image_decode.h"
#include "resample.h"
#include "tar_index.h"
#include "thread_pool.h"

namespace py = pybind11;
using namespace bmclip;

namespace {

struct DecodeError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Member names are bytes; like tarfile, decode them as UTF-8 with surrogateescape so that any name
// (and any error message quoting one) converts to str without raising.
py::str to_str(const std::string& s) {
  PyObject* o = PyUnicode_DecodeUTF8(s.data(), static_cast<Py_ssize_t>(s.size()), "surrogateescape");
  if (!o) throw py::error_already_set();
  return py::reinterpret_steal<py::str>(o);
}

py::list to_str_list(const std::vector<std::string>& v) {
  py::list out;
  for (const auto& s : v) out.append(to_str(s));
  return out;
}

class TarIndex {
 public:
  explicit TarIndex(const std::string& path) : path_(path), file_(path) {
    TarParseResult r = parse_tar(file_.data(), file_.size());
    samples_ = std::move(r.samples);
    errors_ = std::move(r.errors);
    truncated_ = r.truncated;
    dropped_ = r.dropped;
    skipped_members_ = r.skipped_members;
    damage_ = r.damage;
    lost_tail_bytes_ = r.lost_tail_bytes;
    lost_tail_samples_ = r.lost_tail_samples;
  }

  size_t size() const { return samples_.size(); }
  const std::string& path() const { return path_; }

  py::list keys() const {
    py::list k;
    for (const auto& s : samples_) k.append(to_str(s.key));
    return k;
  }

  const TarSample& at(py::ssize_t i) const {
    py::ssize_t n = static_cast<py::ssize_t>(samples_.size());
    if (i < 0) i += n;
    if (i < 0 || i >= n) throw py::index_error("sample index out of range");
    return samples_[static_cast<size_t>(i)];
  }

  static py::dict members_dict(const TarSample& s) {
    py::dict d;
    for (const auto& m : s.members) d[to_str(m.ext)] = py::make_tuple(m.offset, m.size);
    return d;
  }

  py::list samples() const {
    py::list out;
    for (const auto& s : samples_) out.append(py::make_tuple(to_str(s.key), members_dict(s)));
    return out;
  }

  // Flat member table for fast consumers: (sample index, offset, size) int64 arrays and ext list.
  py::tuple member_table() const {
    size_t n = 0;
    for (const auto& s : samples_) n += s.members.size();
    py::array_t<int64_t> sid(n), off(n), sz(n);
    auto a = sid.mutable_unchecked<1>();
    auto b = off.mutable_unchecked<1>();
    auto c = sz.mutable_unchecked<1>();
    py::list exts;
    size_t j = 0;
    for (size_t i = 0; i < samples_.size(); ++i) {
      for (const auto& m : samples_[i].members) {
        a(j) = static_cast<int64_t>(i);
        b(j) = static_cast<int64_t>(m.offset);
        c(j) = static_cast<int64_t>(m.size);
        exts.append(to_str(m.ext));
        ++j;
      }
    }
    return py::make_tuple(sid, off, sz, exts);
  }

  const uint8_t* data() const { return file_.data(); }
  size_t file_size() const { return file_.size(); }
  py::list errors() const { return to_str_list(errors_); }
  bool truncated() const { return truncated_; }
  int64_t dropped() const { return dropped_; }
  int64_t skipped_members() const { return skipped_members_; }
  const std::string& damage() const { return damage_; }
  uint64_t lost_tail_bytes() const { return lost_tail_bytes_; }
  int64_t lost_tail_samples() const { return lost_tail_samples_; }

 private:
  std::string path_;
  MappedFile file_;
  std::vector<TarSample> samples_;
  std::vector<std::string> errors_;
  bool truncated_ = false;
  int64_t dropped_ = 0;
  int64_t skipped_members_ = 0;
  std::string damage_;
  uint64_t lost_tail_bytes_ = 0;
  int64_t lost_tail_samples_ = 0;
};

// Read-only uint8 view into the mapping; `owner` (the TarIndex) stays alive while the view exists.
py::array read_view(py::object owner, int64_t offset, int64_t size) {
  const TarIndex& idx = owner.cast<const TarIndex&>();
  if (offset < 0 || size < 0 || static_cast<uint64_t>(offset) > idx.file_size() ||
      static_cast<uint64_t>(size) > idx.file_size() - static_cast<uint64_t>(offset)) {
    throw py::value_error("read(" + std::to_string(offset) + ", " + std::to_string(size) +
                          ") is outside the file (" + std::to_string(idx.file_size()) + " bytes)");
  }
  static const uint8_t empty = 0;
  const uint8_t* p = size == 0 ? &empty : idx.data() + offset;
  py::array arr(py::dtype::of<uint8_t>(), {static_cast<py::ssize_t>(size)}, {1},
                const_cast<uint8_t*>(p), owner);
  // The mapping is PROT_READ: a write through the view would fault, so forbid it.
  arr.attr("setflags")(py::arg("write") = false);
  return arr;
}

// A bytes-like input pinned for the duration of a batch (buffer protocol, any contiguous 1-D view).
struct InputBuf {
  const uint8_t* ptr;
  size_t size;
};

InputBuf as_input(const py::buffer_info& info, size_t i) {
  if (info.ndim > 1 && info.size > 0) {
    // Only C-contiguous views are accepted; check the strides.
    py::ssize_t expect = info.itemsize;
    for (py::ssize_t d = info.ndim - 1; d >= 0; --d) {
      if (info.shape[d] != 1 && info.strides[d] != expect)
        throw py::value_error("buffer " + std::to_string(i) + " is not contiguous");
      expect *= info.shape[d];
    }
  } else if (info.ndim == 1 && info.size > 1 && info.strides[0] != info.itemsize) {
    throw py::value_error("buffer " + std::to_string(i) + " is not contiguous");
  }
  return InputBuf{static_cast<const uint8_t*>(info.ptr), static_cast<size_t>(info.size * info.itemsize)};
}

Filter parse_filter(const std::string& s) {
  if (s == "bicubic") return Filter::kBicubic;
  if (s == "bilinear") return Filter::kBilinear;
  throw py::value_error("interpolation must be 'bicubic' or 'bilinear', got '" + s + "'");
}

Augment parse_augment(const std::string& s) {
  if (s == "random_resized_crop") return Augment::kRandomResizedCrop;
  if (s == "center") return Augment::kCenter;
  throw py::value_error("augment must be 'random_resized_crop' or 'center', got '" + s + "'");
}

uint64_t seed_bits(const py::int_& seed) {
  // Any Python int; its low 64 bits (two's complement) seed the per-sample generators.
  unsigned long long v = PyLong_AsUnsignedLongLongMask(seed.ptr());
  if (v == static_cast<unsigned long long>(-1) && PyErr_Occurred()) throw py::error_already_set();
  return static_cast<uint64_t>(v);
}

CropParams make_params(const std::string& augment, std::pair<double, double> scale,
                       std::pair<double, double> ratio, const std::string& interpolation, bool dct_scaling,
                       int64_t max_pixels, double dct_min_ratio = 2.0) {
  CropParams p;
  p.augment = parse_augment(augment);
  if (!(scale.first > 0 && scale.first <= scale.second && scale.second <= 1.0))
    throw py::value_error("scale must satisfy 0 < scale[0] <= scale[1] <= 1");
  if (!(ratio.first > 0 && ratio.first <= ratio.second && std::isfinite(ratio.second)))
    throw py::value_error("ratio must satisfy 0 < ratio[0] <= ratio[1] < inf");
  p.scale_min = scale.first;
  p.scale_max = scale.second;
  p.ratio_min = ratio.first;
  p.ratio_max = ratio.second;
  p.filter = parse_filter(interpolation);
  p.dct_scaling = dct_scaling;
  if (!(dct_min_ratio >= 1.0 && std::isfinite(dct_min_ratio)))
    throw py::value_error("dct_min_ratio must be >= 1");
  p.dct_min_ratio = dct_min_ratio;
  p.max_pixels = max_pixels;
  return p;
}

class Decoder {
 public:
  Decoder(int num_threads, int64_t max_pixels) : max_pixels_(max_pixels) {
    if (num_threads <= 0) num_threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
    if (num_threads > 256) throw py::value_error("num_threads must be <= 256");
    if (max_pixels <= 0) throw py::value_error("max_pixels must be positive");
    pool_ = std::make_unique<ThreadPool>(num_threads);
  }

  int num_threads() const { return pool_->num_threads(); }
  int64_t max_pixels() const { return max_pixels_; }

  py::list decode_batch(const py::sequence& buffers, const py::object& out_obj, const std::string& augment,
                        const py::int_& seed, std::pair<double, double> scale,
                        std::pair<double, double> ratio, const std::string& interpolation,
                        bool dct_scaling, double dct_min_ratio) {
    CropParams p = make_params(augment, scale, ratio, interpolation, dct_scaling, max_pixels_, dct_min_ratio);
    const size_t n = py::len(buffers);
    // No implicit conversion: writing into a converted temporary would silently lose the pixels.
    if (!py::isinstance<py::array>(out_obj)) throw py::type_error("out must be a numpy.ndarray (uint8)");
    py::array out = py::reinterpret_borrow<py::array>(out_obj);
    if (out.dtype().kind() != 'u' || out.itemsize() != 1) throw py::type_error("out must be a numpy uint8 array");
    if (out.ndim() != 4 || out.shape(3) != 3 || out.shape(1) != out.shape(2))
      throw py::value_error("out must have shape [N, S, S, 3]");
    if (!(out.flags() & py::array::c_style)) throw py::value_error("out must be C-contiguous");
    if (!out.writeable()) throw py::value_error("out must be writeable");
    if (static_cast<size_t>(out.shape(0)) < n)
      throw py::value_error("out has room for " + std::to_string(out.shape(0)) + " images, got " +
                            std::to_string(n) + " buffers");
    const int S = static_cast<int>(out.shape(1));
    if (S <= 0) throw py::value_error("output size must be positive");
    uint8_t* base = static_cast<uint8_t*>(out.mutable_data());
    const int64_t slot = static_cast<int64_t>(S) * S * 3;
    const uint64_t sbits = seed_bits(seed);

    std::vector<py::buffer_info> infos;
    std::vector<InputBuf> inputs;
    infos.reserve(n);
    inputs.reserve(n);
    for (size_t i = 0; i < n; ++i) {
      py::object o = buffers[i];
      if (!PyObject_CheckBuffer(o.ptr()))
        throw py::type_error("buffer " + std::to_string(i) + " does not support the buffer protocol");
      infos.push_back(py::reinterpret_borrow<py::buffer>(o).request());
      inputs.push_back(as_input(infos.back(), i));
    }
    std::vector<std::string> reasons(n);
    {
      py::gil_scoped_release nogil;
      pool_->parallel_for(n, [&](size_t i) {
        SampleRng rng(sbits, i);
        uint8_t* dst = base + static_cast<int64_t>(i) * slot;
        std::string r = decode_crop_resize(inputs[i].ptr, inputs[i].size, S, p, &rng, dst, S * 3);
        if (!r.empty()) std::memset(dst, 0, static_cast<size_t>(slot));
        reasons[i] = std::move(r);
      });
    }
    py::list result;
    for (auto& r : reasons) {
      if (r.empty()) result.append(py::none());
      else result.append(py::str(r));
    }
    return result;
  }

  // Aspect-kept resize for the dataset builder: the whole image to exactly width x height.
  py::array decode_fit(const py::buffer& buf, int width, int height, const std::string& interpolation,
                       bool dct_scaling, double dct_min_ratio) const {
    if (width <= 0 || height <= 0) throw py::value_error("width and height must be positive");
    CropParams p = make_params("center", {1.0, 1.0}, {1.0, 1.0}, interpolation, dct_scaling, max_pixels_,
                               dct_min_ratio);
    p.augment = Augment::kFit;
    p.fit_w = width;
    p.fit_h = height;
    py::buffer_info info = buf.request();
    InputBuf in = as_input(info, 0);
    py::array_t<uint8_t> out({static_cast<py::ssize_t>(height), static_cast<py::ssize_t>(width),
                              static_cast<py::ssize_t>(3)});
    uint8_t* dst = out.mutable_data();
    std::string r;
    {
      py::gil_scoped_release nogil;
      SampleRng rng(0, 0);
      r = decode_crop_resize(in.ptr, in.size, 0, p, &rng, dst, static_cast<int64_t>(width) * 3);
    }
    if (!r.empty()) throw DecodeError(r);
    return out;
  }

  // Dataset-builder transcode (see transcode_jpeg): (jpeg bytes, luma uint8 [height, width]) or None when
  // the source is not a YCbCr/greyscale JPEG.
  py::object transcode_jpeg(const py::buffer& buf, int width, int height, int quality) const {
    if (width <= 0 || height <= 0) throw py::value_error("width and height must be positive");
    if (quality < 1 || quality > 100) throw py::value_error("quality must be in 1..100");
    py::buffer_info info = buf.request();
    InputBuf in = as_input(info, 0);
    Transcoded t;
    std::string r;
    {
      py::gil_scoped_release nogil;
      r = bmclip::transcode_jpeg(in.ptr, in.size, width, height, quality, max_pixels_, &t);
    }
    if (r == kTranscodeUnsupported) return py::none();
    if (!r.empty()) throw DecodeError(r);
    py::array_t<uint8_t> luma({static_cast<py::ssize_t>(height), static_cast<py::ssize_t>(width)});
    memcpy(luma.mutable_data(), t.luma.data(), t.luma.size());
    return py::make_tuple(py::bytes(t.jpeg), luma);
  }

  py::array decode_image(const py::buffer& buf) const {
    py::buffer_info info = buf.request();
    InputBuf in = as_input(info, 0);
    auto pixels = std::make_unique<std::vector<uint8_t>>();
    int w = 0, h = 0;
    std::string r;
    {
      py::gil_scoped_release nogil;
      r = decode_full(in.ptr, in.size, max_pixels_, pixels.get(), &w, &h);
    }
    if (!r.empty()) throw DecodeError(r);
    std::vector<uint8_t>* raw = pixels.release();
    py::capsule owner(raw, [](void* v) { delete static_cast<std::vector<uint8_t>*>(v); });
    std::vector<py::ssize_t> shape{h, w, 3};
    std::vector<py::ssize_t> strides{static_cast<py::ssize_t>(w) * 3, 3, 1};
    return py::array(py::dtype::of<uint8_t>(), shape, strides, raw->data(), owner);
  }

 private:
  int64_t max_pixels_;
  std::unique_ptr<ThreadPool> pool_;
};

py::tuple image_info(const py::buffer& buf) {
  py::buffer_info info = buf.request();
  InputBuf in = as_input(info, 0);
  int w = 0, h = 0;
  ImageFormat fmt;
  std::string r = probe_image(in.ptr, in.size, &w, &h, &fmt);
  if (!r.empty()) throw DecodeError(r);
  return py::make_tuple(w, h, format_name(fmt));
}

py::tuple crop_box(int width, int height, int size, const py::int_& seed, uint64_t index,
                   const std::string& augment, std::pair<double, double> scale,
                   std::pair<double, double> ratio) {
  if (width <= 0 || height <= 0 || size <= 0) throw py::value_error("sizes must be positive");
  CropParams p = make_params(augment, scale, ratio, "bicubic", false, 1);
  SampleRng rng(seed_bits(seed), index);
  CropBox b = choose_crop(width, height, size, p, &rng);
  return py::make_tuple(py::make_tuple(b.win_x, b.win_y, b.win_x + b.win_w, b.win_y + b.win_h),
                        py::make_tuple(b.full_w, b.full_h), py::make_tuple(b.off_x, b.off_y));
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "bmclip native loader: tar shard index, JPEG/PNG decode, fused crop+resize";

  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const FileError& e) {
      errno = e.err;
      PyErr_SetFromErrnoWithFilename(PyExc_OSError, e.path.c_str());
    } catch (const DecodeError& e) {
      // Raised as bmclip.errors.DataError (imported lazily: the package imports this module).
      try {
        py::object cls = py::module_::import("bmclip.errors").attr("DataError");
        PyErr_SetString(cls.ptr(), e.what());
      } catch (py::error_already_set&) {
        PyErr_SetString(PyExc_ValueError, e.what());
      }
    }
  });

  py::class_<TarIndex>(m, "TarIndex", "Index of a webdataset tar shard (memory-mapped, read-only).")
      .def(py::init<const std::string&>(), py::arg("path"),
           "Map `path` and group its members into samples; OSError if it cannot be opened.")
      .def("__len__", &TarIndex::size, "Number of complete samples.")
      .def("keys", &TarIndex::keys, "Sample keys in tar order: list[str].")
      .def(
          "sample", [](const TarIndex& self, py::ssize_t i) { return TarIndex::members_dict(self.at(i)); },
          py::arg("i"), "Members of sample i: dict[ext, (offset, size)].")
      .def("key", [](const TarIndex& self, py::ssize_t i) { return to_str(self.at(i).key); }, py::arg("i"),
           "Key of sample i.")
      .def("samples", &TarIndex::samples, "All samples: list[(key, dict[ext, (offset, size)])].")
      .def("member_table", &TarIndex::member_table,
           "Flat table (sample_idx int64[M], offset int64[M], size int64[M], exts list[str]).")
      .def("read", &read_view, py::arg("offset"), py::arg("size"),
           "Zero-copy read-only uint8[size] view of the file bytes at offset (bounds-checked).")
      .def_property_readonly("errors", &TarIndex::errors, "Reasons parsing stopped or skipped: list[str].")
      .def_property_readonly("truncated", &TarIndex::truncated,
                             "True when the archive did not end with a clean end-of-archive marker.")
      .def_property_readonly("dropped", &TarIndex::dropped,
                             "Samples dropped because the archive is damaged at or inside them.")
      .def_property_readonly("skipped_members", &TarIndex::skipped_members,
                             "Non-regular members and names without a key.ext split.")
      .def_property_readonly("damage", &TarIndex::damage,
                             "Why parsing stopped early: '' (clean end), 'empty', 'truncated' or 'bad_header'.")
      .def_property_readonly("lost_tail_bytes", &TarIndex::lost_tail_bytes,
                             "Bytes from the point where parsing stopped to the end of the file.")
      .def_property_readonly("lost_tail_samples", &TarIndex::lost_tail_samples,
                             "Samples whose headers appear after a bad header (not read; 0 for a cut-off file).")
      .def_property_readonly("path", &TarIndex::path, "The shard path.")
      .def_property_readonly("file_size", &TarIndex::file_size, "Size of the file in bytes.")
      .def("__repr__", [](const TarIndex& self) {
        return "<TarIndex " + self.path() + ": " + std::to_string(self.size()) + " samples" +
               (self.truncated() ? ", truncated" : "") + ">";
      });

  py::class_<Decoder>(m, "Decoder", "Persistent C++ thread pool decoding JPEG/PNG into uint8 NHWC batches.")
      .def(py::init<int, int64_t>(), py::arg("num_threads") = 1, py::arg("max_pixels") = 178956970,
           "num_threads counts the calling thread (0 = all cores); images above max_pixels are refused.")
      .def_property_readonly("num_threads", &Decoder::num_threads)
      .def_property_readonly("max_pixels", &Decoder::max_pixels)
      .def("decode_batch", &Decoder::decode_batch, py::arg("buffers"), py::arg("out"), py::kw_only(),
           py::arg("augment") = "random_resized_crop", py::arg("seed") = 0,
           py::arg("scale") = std::pair<double, double>(0.9, 1.0),
           py::arg("ratio") = std::pair<double, double>(3.0 / 4.0, 4.0 / 3.0),
           py::arg("interpolation") = "bicubic", py::arg("dct_scaling") = true,
           py::arg("dct_min_ratio") = 2.0,
           "Decode len(buffers) images into out[:len(buffers)] (uint8 [N, S, S, 3], C-contiguous) with "
           "RandomResizedCrop or resize+centre-crop; returns list[str | None] (None = ok, else the skip "
           "reason; failed slots are zeroed). The GIL is released for the whole batch; sample i's crop "
           "depends only on (seed, i).")
      .def("decode_fit", &Decoder::decode_fit, py::arg("buffer"), py::arg("width"), py::arg("height"),
           py::kw_only(), py::arg("interpolation") = "bilinear", py::arg("dct_scaling") = true,
           py::arg("dct_min_ratio") = 1.0,
           "Decode a JPEG/PNG and resize the whole image to exactly width x height (Pillow's antialiased "
           "filter, bit-exact at full DCT scale): uint8 [height, width, 3]; raises bmclip.errors.DataError. "
           "dct_scaling decodes JPEGs at the smallest 1/2, 1/4 or 1/8 scale keeping >= dct_min_ratio "
           "decoded pixels per output pixel.")
      .def("transcode_jpeg", &Decoder::transcode_jpeg, py::arg("buffer"), py::arg("width"), py::arg("height"),
           py::kw_only(), py::arg("quality") = 90,
           "Dataset builder: a YCbCr or greyscale JPEG -> (JPEG bytes of the image resized to width x height, "
           "baseline 4:2:0 at `quality`; its luma plane uint8 [height, width]), working on the decoded planes "
           "(DCT-scaled decode, no colour conversion, Pillow's antialiased bilinear filter per plane). None for "
           "other JPEGs (CMYK/YCCK) and non-JPEG input; raises bmclip.errors.DataError on a bad image.")
      .def("decode_image", &Decoder::decode_image, py::arg("buffer"),
           "Full-size RGB decode: uint8 [H, W, 3]; raises bmclip.errors.DataError on a bad image.");

  m.def("_set_simd", &set_simd_enabled, py::arg("enabled"),
        "Testing hook: use (True, default) or bypass (False) the AVX2 resampling passes.");
  m.def("_simd", &simd_enabled, "Whether the AVX2 resampling passes may be used.");
  m.def("image_info", &image_info, py::arg("buffer"),
        "Header-only probe: (width, height, format str); raises bmclip.errors.DataError.");
  m.def("crop_box", &crop_box, py::arg("width"), py::arg("height"), py::arg("size"), py::arg("seed"),
        py::arg("index"), py::arg("augment") = "random_resized_crop",
        py::arg("scale") = std::pair<double, double>(0.9, 1.0),
        py::arg("ratio") = std::pair<double, double>(3.0 / 4.0, 4.0 / 3.0),
        "The crop decode_batch uses for sample `index`: (window (x0, y0, x1, y1), (resized_w, "
        "resized_h), (off_x, off_y)): the output equals Pillow's "
        "img.crop(window).resize(resized, resample)[off_y:off_y+S, off_x:off_x+S].");
}
