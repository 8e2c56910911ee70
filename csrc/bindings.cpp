// pybind11 module bmclip._C: TarIndex (mmap'd webdataset shard index) and Decoder (threaded
// JPEG/PNG decode + fused crop/resize into a caller-provided NHWC uint8 batch).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <string>
#include <vector>

#include "tar_index.h"

namespace py = pybind11;
using namespace bmclip;

namespace {

class TarIndex {
 public:
  explicit TarIndex(const std::string& path) : path_(path), file_(path) {
    TarParseResult r = parse_tar(file_.data(), file_.size());
    samples_ = std::move(r.samples);
    errors_ = std::move(r.errors);
    truncated_ = r.truncated;
    dropped_ = r.dropped;
    skipped_members_ = r.skipped_members;
  }

  size_t size() const { return samples_.size(); }
  const std::string& path() const { return path_; }

  std::vector<std::string> keys() const {
    std::vector<std::string> k;
    k.reserve(samples_.size());
    for (const auto& s : samples_) k.push_back(s.key);
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
    for (const auto& m : s.members) d[py::str(m.ext)] = py::make_tuple(m.offset, m.size);
    return d;
  }

  py::list samples() const {
    py::list out;
    for (const auto& s : samples_) out.append(py::make_tuple(s.key, members_dict(s)));
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
        exts.append(m.ext);
        ++j;
      }
    }
    return py::make_tuple(sid, off, sz, exts);
  }

  const uint8_t* data() const { return file_.data(); }
  size_t file_size() const { return file_.size(); }
  const std::vector<std::string>& errors() const { return errors_; }
  bool truncated() const { return truncated_; }
  int64_t dropped() const { return dropped_; }
  int64_t skipped_members() const { return skipped_members_; }

 private:
  std::string path_;
  MappedFile file_;
  std::vector<TarSample> samples_;
  std::vector<std::string> errors_;
  bool truncated_ = false;
  int64_t dropped_ = 0;
  int64_t skipped_members_ = 0;
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

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "bmclip native loader: tar shard index, JPEG/PNG decode, fused crop+resize";

  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const FileError& e) {
      errno = e.err;
      PyErr_SetFromErrnoWithFilename(PyExc_OSError, e.path.c_str());
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
      .def("key", [](const TarIndex& self, py::ssize_t i) { return self.at(i).key; }, py::arg("i"),
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
      .def_property_readonly("path", &TarIndex::path, "The shard path.")
      .def_property_readonly("file_size", &TarIndex::file_size, "Size of the file in bytes.")
      .def("__repr__", [](const TarIndex& self) {
        return "<TarIndex " + self.path() + ": " + std::to_string(self.size()) + " samples" +
               (self.truncated() ? ", truncated" : "") + ">";
      });
}
