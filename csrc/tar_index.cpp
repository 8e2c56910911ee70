// Tar parsing follows POSIX ustar plus the GNU ('L'/'K' long names, base-256 sizes) and pax ('x'
// per-file records, 'g' global records) extensions, mirroring what Python's tarfile accepts.
#include "tar_index.h"

#include <atomic>
#include <cerrno>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <fcntl.h>
#include <mutex>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

namespace bmclip {
namespace {

constexpr size_t kBlock = 512;

std::string field_str(const uint8_t* p, size_t n) {
  size_t len = 0;
  while (len < n && p[len] != 0) ++len;
  return std::string(reinterpret_cast<const char*>(p), len);
}

// Numeric header field: octal text (space/NUL padded) or GNU base-256 (high bit of first byte).
bool parse_number(const uint8_t* p, size_t n, uint64_t* out) {
  if (p[0] & 0x80) {
    if (p[0] == 0xff) return false;  // negative base-256 value: never valid for sizes
    uint64_t v = p[0] & 0x7f;
    for (size_t i = 1; i < n; ++i) {
      if (v >> 55) return false;  // would overflow 64 bits
      v = (v << 8) | p[i];
    }
    *out = v;
    return true;
  }
  size_t i = 0;
  while (i < n && (p[i] == ' ' || p[i] == 0)) ++i;
  uint64_t v = 0;
  bool any = false;
  for (; i < n && p[i] >= '0' && p[i] <= '7'; ++i) {
    if (v >> 60) return false;
    v = v * 8 + (p[i] - '0');
    any = true;
  }
  for (; i < n; ++i) {
    if (p[i] != ' ' && p[i] != 0) return false;  // junk after the digits
  }
  *out = any ? v : 0;
  return true;
}

bool is_zero_block(const uint8_t* p) {
  for (size_t i = 0; i < kBlock; ++i)
    if (p[i]) return false;
  return true;
}

bool checksum_ok(const uint8_t* h) {
  uint64_t stored;
  if (!parse_number(h + 148, 8, &stored)) return false;
  // tarfile accepts both the unsigned and the (historic) signed byte sum.
  int64_t usum = 0, ssum = 0;
  for (size_t i = 0; i < kBlock; ++i) {
    uint8_t c = (i >= 148 && i < 156) ? ' ' : h[i];
    usum += c;
    ssum += static_cast<int8_t>(c);
  }
  return static_cast<int64_t>(stored) == usum || static_cast<int64_t>(stored) == ssum;
}

uint64_t round_up(uint64_t n) { return (n + kBlock - 1) / kBlock * kBlock; }

// Parses pax "LEN key=value\n" records; returns false on malformed records.
bool parse_pax(const uint8_t* p, size_t n, std::string* path, bool* has_path, uint64_t* size,
               bool* has_size) {
  size_t pos = 0;
  while (pos < n) {
    if (p[pos] == 0) break;  // NUL padding after the last record
    size_t i = pos;
    uint64_t len = 0;
    while (i < n && p[i] >= '0' && p[i] <= '9') {
      len = len * 10 + (p[i] - '0');
      if (len > n) return false;
      ++i;
    }
    if (i >= n || p[i] != ' ' || len == 0 || pos + len > n || len < (i - pos) + 2) return false;
    size_t rec_end = pos + len;  // one past the '\n'
    if (p[rec_end - 1] != '\n') return false;
    const uint8_t* kv = p + i + 1;
    size_t kvlen = rec_end - 1 - (i + 1);
    const void* eq = memchr(kv, '=', kvlen);
    if (!eq) return false;
    size_t klen = static_cast<const uint8_t*>(eq) - kv;
    std::string k(reinterpret_cast<const char*>(kv), klen);
    std::string v(reinterpret_cast<const char*>(kv) + klen + 1, kvlen - klen - 1);
    if (k == "path") {
      *path = v;
      *has_path = true;
    } else if (k == "size") {
      if (v.empty() || v.size() > 19) return false;
      uint64_t s = 0;
      for (char c : v) {
        if (c < '0' || c > '9') return false;
        s = s * 10 + (c - '0');
      }
      *size = s;
      *has_size = true;
    }
    pos = rec_end;
  }
  return true;
}

}  // namespace

// Samples whose member headers appear in data[from:size]: 512-byte aligned blocks with a valid
// header checksum and a regular member name with a key; consecutive members with the same key are
// one sample, and members of `open_key` (the sample already counted as dropped) are not counted.
// A header's data is jumped over when its size field parses and fits, else the scan moves on by one
// block.
static int64_t count_samples_after(const uint8_t* data, size_t size, uint64_t from,
                                   const std::string& open_key) {
  int64_t n = 0;
  std::string last = open_key;
  for (uint64_t pos = from; pos + kBlock <= size;) {
    const uint8_t* h = data + pos;
    uint64_t msize;
    if (is_zero_block(h) || !checksum_ok(h) || !parse_number(h + 124, 12, &msize)) {
      pos += kBlock;
      continue;
    }
    char type = static_cast<char>(h[156]);
    std::string key, ext;
    if ((type == '0' || type == '\0' || type == '7') && split_key_ext(field_str(h, 100), &key, &ext) &&
        key != last) {
      ++n;
      last = key;
    }
    uint64_t next = pos + kBlock + round_up(msize);
    pos = (next > pos && next <= size) ? next : pos + kBlock;
  }
  return n;
}

bool split_key_ext(const std::string& path, std::string* key, std::string* ext) {
  size_t slash = path.rfind('/');
  size_t base = slash == std::string::npos ? 0 : slash + 1;
  size_t dot = path.find('.', base);
  // webdataset's regex ^((?:.*/|)[^.]+)[.]([^/]*)$ needs >= 1 char before the first dot.
  if (dot == std::string::npos || dot == base) return false;
  *key = path.substr(0, dot);
  *ext = path.substr(dot + 1);
  for (char& c : *ext)
    if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
  return true;
}

TarParseResult parse_tar(const uint8_t* data, size_t size) {
  TarParseResult r;
  TarSample current;
  bool have_current = false;
  uint64_t pos = 0;
  std::string long_name;
  bool has_long_name = false;
  std::string pax_path;
  bool has_pax_path = false;
  uint64_t pax_size = 0;
  bool has_pax_size = false;
  bool clean_end = false;

  auto fail = [&](const std::string& msg, const char* kind = "truncated") {
    r.errors.push_back(msg);
    r.truncated = true;
    r.damage = kind;
    r.lost_tail_bytes = size - std::min<uint64_t>(pos, size);
  };

  if (size == 0) {
    fail("empty tar file", "empty");
    return r;
  }
  while (true) {
    if (pos == size) {
      fail("truncated tar at offset " + std::to_string(pos) + ": no end-of-archive marker");
      break;
    }
    if (pos + kBlock > size) {
      fail("truncated tar at offset " + std::to_string(pos) + ": partial header");
      break;
    }
    const uint8_t* h = data + pos;
    if (is_zero_block(h)) {
      clean_end = true;  // tarfile also stops at the first zero block
      break;
    }
    if (!checksum_ok(h)) {
      fail("bad header checksum at offset " + std::to_string(pos), "bad_header");
      break;
    }
    uint64_t msize;
    if (!parse_number(h + 124, 12, &msize)) {
      fail("bad size field at offset " + std::to_string(pos), "bad_header");
      break;
    }
    char type = static_cast<char>(h[156]);
    uint64_t data_off = pos + kBlock;
    bool is_meta = type == 'L' || type == 'K' || type == 'x' || type == 'g' || type == 'X';
    if (!is_meta && has_pax_size) msize = pax_size;
    // Link, directory, fifo and device headers carry no data in practice; tarfile skips none for them.
    bool no_data = type == '1' || type == '2' || type == '3' || type == '4' || type == '5' ||
                   type == '6';
    uint64_t data_len = no_data ? 0 : msize;
    bool data_fits = data_len <= size - data_off;
    auto fail_data = [&]() {
      fail("truncated tar at offset " + std::to_string(pos) + ": member needs " +
           std::to_string(data_len) + " bytes, " + std::to_string(size - data_off) + " left");
    };
    uint64_t next = data_off + round_up(data_len);
    if (next > size) next = size;  // a final member without padding still counts as complete

    if (is_meta) {
      if (!data_fits) {
        fail_data();
        break;
      }
      if (type == 'L') {
        long_name = field_str(data + data_off, static_cast<size_t>(msize));
        has_long_name = true;
      } else if (type == 'x' || type == 'X') {
        if (!parse_pax(data + data_off, static_cast<size_t>(msize), &pax_path, &has_pax_path,
                       &pax_size, &has_pax_size)) {
          fail("bad pax header at offset " + std::to_string(pos), "bad_header");
          break;
        }
      }
      // 'K' (long link name) and 'g' (global pax records) do not affect sample grouping.
      pos = next;
      continue;
    }

    std::string name;
    if (has_pax_path) {
      name = pax_path;
    } else if (has_long_name) {
      name = long_name;
    } else {
      name = field_str(h, 100);
      // POSIX ustar splits long paths into prefix + name; GNU headers reuse that area.
      if (memcmp(h + 257, "ustar\0", 6) == 0) {
        std::string prefix = field_str(h + 345, 155);
        if (!prefix.empty()) name = prefix + "/" + name;
      }
    }
    has_long_name = has_pax_path = has_pax_size = false;
    long_name.clear();
    pax_path.clear();
    uint64_t header_off = pos;

    bool regular = type == '0' || type == '\0' || type == '7';
    if (regular && type == '\0' && !name.empty() && name.back() == '/') regular = false;  // old dirs
    std::string key, ext;
    if (!regular || !split_key_ext(name, &key, &ext)) {
      if (!data_fits) {
        fail_data();
        break;
      }
      ++r.skipped_members;
      pos = next;
      continue;
    }
    // A complete header with a new key proves the open sample is complete, even if this member's
    // data is cut off below.
    if (!have_current || key != current.key) {
      if (have_current) r.samples.push_back(std::move(current));
      current = TarSample();
      current.key = key;
      have_current = true;
    }
    if (!data_fits) {
      fail_data();
      break;
    }
    pos = next;
    bool dup = false;
    for (const auto& m : current.members)
      if (m.ext == ext) dup = true;
    if (dup) {
      // webdataset raises on this; we keep the first copy and report the repeat.
      r.errors.push_back("duplicate member " + name + " at offset " + std::to_string(header_off));
      ++r.skipped_members;
      continue;
    }
    current.members.push_back(TarMember{ext, data_off, msize});
  }
  if (r.damage == "bad_header") r.lost_tail_samples = count_samples_after(data, size, pos + kBlock,
                                                                         have_current ? current.key : "");
  if (have_current) {
    if (clean_end) {
      r.samples.push_back(std::move(current));
    } else {
      r.errors.push_back("dropped sample '" + current.key + "' (may continue past the damage)");
      ++r.dropped;
    }
  }
  return r;
}

namespace {

// The live mappings, for the SIGBUS handler: a fixed table of atomics (a signal handler may not lock or allocate).
constexpr int kMaxMappings = 4096;
struct MappingSlot {
  std::atomic<uintptr_t> begin{0}, end{0};
  std::atomic<char*> path{nullptr};
};
MappingSlot g_mappings[kMaxMappings];
struct sigaction g_previous_sigbus;
std::once_flag g_sigbus_installed;

void write_all(const char* s) {
  size_t n = strlen(s);
  while (n > 0) {
    ssize_t w = ::write(2, s, n);
    if (w <= 0) return;
    s += w;
    n -= static_cast<size_t>(w);
  }
}

void on_sigbus(int sig, siginfo_t* info, void* context) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(info->si_addr);
  for (auto& m : g_mappings) {
    const uintptr_t b = m.begin.load(std::memory_order_acquire);
    if (b != 0 && a >= b && a < m.end.load(std::memory_order_acquire)) {
      const char* path = m.path.load(std::memory_order_acquire);
      write_all("bmclip: SIGBUS reading shard ");
      write_all(path ? path : "?");
      write_all(": the file was truncated or rewritten while it was being read; shards must not change during a "
                "run (write new shards under new names, or stop the run first)\n");
      break;
    }
  }
  if (g_previous_sigbus.sa_flags & SA_SIGINFO) {
    if (g_previous_sigbus.sa_sigaction != nullptr) {
      g_previous_sigbus.sa_sigaction(sig, info, context);
      return;
    }
  } else if (g_previous_sigbus.sa_handler != SIG_DFL && g_previous_sigbus.sa_handler != SIG_IGN) {
    g_previous_sigbus.sa_handler(sig);
    return;
  }
  // The default action: returning re-runs the faulting read, which now kills the process with SIGBUS.
  struct sigaction dfl;
  memset(&dfl, 0, sizeof(dfl));
  dfl.sa_handler = SIG_DFL;
  sigemptyset(&dfl.sa_mask);
  sigaction(SIGBUS, &dfl, nullptr);
}

int register_mapping(const void* data, size_t size, const std::string& path) {
  std::call_once(g_sigbus_installed, [] {
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_sigaction = on_sigbus;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGBUS, &sa, &g_previous_sigbus);
  });
  for (int i = 0; i < kMaxMappings; ++i) {
    uintptr_t expected = 0;
    MappingSlot& m = g_mappings[i];
    // claim the slot with a placeholder begin, fill it, then publish the real range
    if (m.begin.compare_exchange_strong(expected, 1, std::memory_order_acq_rel)) {
      m.path.store(strdup(path.c_str()), std::memory_order_release);
      m.end.store(reinterpret_cast<uintptr_t>(data) + size, std::memory_order_release);
      m.begin.store(reinterpret_cast<uintptr_t>(data), std::memory_order_release);
      return i;
    }
  }
  return -1;  // more live mappings than the table holds: this one faults without the message
}

void unregister_mapping(int slot) {
  if (slot < 0) return;
  MappingSlot& m = g_mappings[slot];
  m.begin.store(1, std::memory_order_release);  // still claimed, matches no address
  m.end.store(0, std::memory_order_release);
  free(m.path.exchange(nullptr, std::memory_order_acq_rel));
  m.begin.store(0, std::memory_order_release);
}

}  // namespace

MappedFile::MappedFile(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw FileError(errno, path, "cannot open " + path + ": " + strerror(errno));
  struct stat st;
  if (fstat(fd, &st) != 0) {
    int e = errno;
    ::close(fd);
    throw FileError(e, path, "cannot stat " + path + ": " + strerror(e));
  }
  if (S_ISDIR(st.st_mode)) {
    ::close(fd);
    throw FileError(EISDIR, path, "is a directory: " + path);
  }
  size_ = static_cast<size_t>(st.st_size);
  if (size_ > 0) {
    void* p = mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) {
      int e = errno;
      ::close(fd);
      throw FileError(e, path, "cannot mmap " + path + ": " + strerror(e));
    }
    // Members are read front to back by the loader.
    madvise(p, size_, MADV_SEQUENTIAL);
    data_ = static_cast<const uint8_t*>(p);
    slot_ = register_mapping(p, size_, path);
  }
  ::close(fd);
}

MappedFile::~MappedFile() {
  unregister_mapping(slot_);
  if (data_) munmap(const_cast<uint8_t*>(data_), size_);
}

}  // namespace bmclip
