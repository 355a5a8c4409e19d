// Content index of full KV pages for the page allocator's prefix caching (csrc/page_allocator_prefix.cpp).
//
// A full page is named by a chained hash: hash(page j) = mix(hash(page j-1), the page's page_size tokens), so equal
// hashes mean equal prefixes up to and including the page, as in vLLM's and nano-vllm's block hashing. Unlike a bare
// hash map, a hit is confirmed by comparing the page's stored tokens and its parent page (the page before it in the
// sequence that wrote it) with the caller's previous page, itself confirmed the same way. So a 64-bit collision can
// never hand a sequence the K/V of different tokens (that would silently corrupt its completion), and a lookup walks
// a sequence's pages in order and stops at the first miss.
//
// The index only names pages; it holds no reference. The allocator calls forget(page) whenever it hands a page out
// for new content, so an entry never outlives the tokens it describes.
#pragma once

#include <cstdint>
#include <unordered_map>
#include <vector>

namespace dash {

class PrefixIndex {
 public:
  static constexpr uint64_t kRoot = 0x9E3779B97F4A7C15ull;  // hash "before" a sequence's first page

  PrefixIndex(int64_t num_pages, int64_t page_size)
      : page_size_(page_size),
        hash_of_(num_pages, 0),
        parent_(num_pages, kNoPage),
        indexed_(num_pages, 0),
        tokens_(num_pages * page_size) {}

  static constexpr int32_t kNoPage = -1;  // parent of a sequence's first page

  // splitmix64 finaliser over the parent hash and each token: cheap, and well mixed enough that the token check
  // below is a safety net rather than a common path.
  static uint64_t chain(uint64_t parent, const int64_t* tokens, int64_t n) {
    uint64_t h = parent;
    for (int64_t i = 0; i < n; ++i) {
      h ^= static_cast<uint64_t>(tokens[i]) + 0x9E3779B97F4A7C15ull + (h << 6) + (h >> 2);
      h = (h ^ (h >> 30)) * 0xBF58476D1CE4E5B9ull;
      h = (h ^ (h >> 27)) * 0x94D049BB133111EBull;
      h ^= h >> 31;
    }
    return h;
  }

  // The page holding exactly these page_size tokens after `parent` (kNoPage for a first page), or -1.
  int32_t lookup(uint64_t hash, const int64_t* tokens, int32_t parent) const {
    auto it = by_hash_.find(hash);
    if (it == by_hash_.end() || parent_[it->second] != parent) return -1;
    const int32_t* stored = tokens_.data() + static_cast<int64_t>(it->second) * page_size_;
    for (int64_t i = 0; i < page_size_; ++i) {
      if (stored[i] != tokens[i]) return -1;
    }
    return it->second;
  }

  // Name `page` by (hash, tokens); an older page under the same hash is left unnamed (it stays valid K/V, it just
  // cannot be found any more, and it returns to the free list through its reference count as usual).
  void insert(uint64_t hash, int32_t page, const int64_t* tokens, int32_t parent) {
    auto it = by_hash_.find(hash);
    if (it != by_hash_.end()) indexed_[it->second] = 0;
    by_hash_[hash] = page;
    hash_of_[page] = hash;
    parent_[page] = parent;
    indexed_[page] = 1;
    int32_t* stored = tokens_.data() + static_cast<int64_t>(page) * page_size_;
    for (int64_t i = 0; i < page_size_; ++i) stored[i] = static_cast<int32_t>(tokens[i]);
  }

  // The page is about to hold other tokens: drop its name.
  void forget(int32_t page) {
    if (!indexed_[page]) return;
    indexed_[page] = 0;
    auto it = by_hash_.find(hash_of_[page]);
    if (it != by_hash_.end() && it->second == page) by_hash_.erase(it);
  }

  bool contains(int32_t page) const { return indexed_[page] != 0; }
  int64_t size() const { return static_cast<int64_t>(by_hash_.size()); }

 private:
  int64_t page_size_;
  std::unordered_map<uint64_t, int32_t> by_hash_;
  std::vector<uint64_t> hash_of_;  // [num_pages] the hash a page was indexed under
  std::vector<int32_t> parent_;    // [num_pages] the page before it when it was indexed (kNoPage: first page)
  std::vector<uint8_t> indexed_;   // [num_pages] 1 while by_hash_ names the page
  std::vector<int32_t> tokens_;    // [num_pages * page_size] tokens of indexed pages (token ids fit in int32)
};

}  // namespace dash
