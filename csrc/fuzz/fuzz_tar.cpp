// libFuzzer target for the tar indexer (built with -DBMCLIP_FUZZERS=ON under clang, ASan + UBSan).
// Besides memory errors it checks the index's own invariants and aborts when one breaks.
#include <cstdint>
#include <cstdlib>
#include <set>

#include "tar_index.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  bmclip::TarParseResult r = bmclip::parse_tar(data, size);
  for (const auto& s : r.samples) {
    if (s.key.empty() || s.members.empty()) abort();
    std::set<std::string> exts;
    for (const auto& m : s.members) {
      if (m.offset > size || m.size > size - m.offset) abort();  // member must lie inside the file
      if (!exts.insert(m.ext).second) abort();                  // extensions unique per sample
      volatile uint8_t sink = 0;
      if (m.size) sink ^= data[m.offset] ^ data[m.offset + m.size - 1];
      (void)sink;
    }
  }
  if (!r.truncated && r.dropped) abort();
  if (r.truncated && r.errors.empty()) abort();
  return 0;
}
