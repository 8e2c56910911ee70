// Webdataset tar shard indexer: mmaps a tar file and groups its regular members into samples.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

namespace bmclip {

// One regular file inside the tar: where its bytes are in the mapped file.
struct TarMember {
  std::string ext;     // lower-cased extension after the first dot of the basename
  uint64_t offset;     // byte offset of the data inside the tar
  uint64_t size;       // data size in bytes
};

// A webdataset sample: consecutive members sharing a key.
struct TarSample {
  std::string key;
  std::vector<TarMember> members;  // in tar order; extensions are unique within a sample
};

// Raised when the file cannot be opened or mapped (carries errno for an OSError).
struct FileError : std::runtime_error {
  int err;
  std::string path;
  FileError(int e, std::string p, const std::string& what)
      : std::runtime_error(what), err(e), path(std::move(p)) {}
};

// Splits a member path into (key, ext) by webdataset's rule: key = directory prefix + basename up to
// its first dot, ext = the rest (lower-cased). Returns false for names without such a dot
// (webdataset drops them too).
bool split_key_ext(const std::string& path, std::string* key, std::string* ext);

// Parses `data[0:size]` as a tar archive. Never throws on damaged data: parsing stops at the first
// problem, which is appended to `errors`; the sample open at that point is dropped (its members may
// continue past the damage) and counted in `dropped`.
struct TarParseResult {
  std::vector<TarSample> samples;
  std::vector<std::string> errors;
  bool truncated = false;    // parsing stopped before a clean end-of-archive marker
  int64_t dropped = 0;       // samples dropped because of damage or duplicate members
  int64_t skipped_members = 0;  // non-regular members and regular ones without a key/ext split
  // Where parsing stopped when it did not reach a clean end: the kind of damage ("" when none,
  // "empty", "truncated" or "bad_header"), the bytes from the stop point to the end of the file,
  // and the samples whose headers still appear in those bytes (found by scanning for valid headers;
  // they are not read, since parsing stops at the first damage).
  std::string damage;
  uint64_t lost_tail_bytes = 0;
  int64_t lost_tail_samples = 0;
};
TarParseResult parse_tar(const uint8_t* data, size_t size);

// Read-only memory map of a whole file (empty files map to nullptr/0). A file shortened while it is mapped makes
// a read past its new end raise SIGBUS, which kills the process; while any MappedFile is alive a SIGBUS handler
// first says which shard it was on stderr (then the signal takes its default course, or the handler that was
// there before runs for a fault outside every mapping).
class MappedFile {
 public:
  explicit MappedFile(const std::string& path);
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  const uint8_t* data() const { return data_; }
  size_t size() const { return size_; }

 private:
  const uint8_t* data_ = nullptr;
  size_t size_ = 0;
  int slot_ = -1;  // this mapping's entry in the SIGBUS handler's table (-1: not registered)
};

}  // namespace bmclip
