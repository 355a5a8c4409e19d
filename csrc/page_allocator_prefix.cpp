// PageAllocator::allocate_cached (csrc/page_allocator.h): allocation with prefix caching. It plans every page first
// (a hit on a named page, a page shared with an earlier sequence of the same call, or a new page) and commits only
// when the whole plan fits, so an out-of-pages ValueError leaves the allocator unchanged.
#include <algorithm>
#include <numeric>
#include <unordered_map>
#include <unordered_set>

#include "page_allocator.h"

namespace dash {

using alloc::ids_ptr;
using alloc::int32_tensor;
using alloc::value_error;

std::vector<at::Tensor> PageAllocator::allocate_cached(const at::Tensor& seq_ids, const at::Tensor& tokens,
                                                       const at::Tensor& lens) {
  const int64_t* ids = ids_ptr(seq_ids, "seq_ids");
  const int64_t* n = ids_ptr(lens, "lens");
  const int64_t* tok = ids_ptr(tokens, "tokens");
  const int64_t B = seq_ids.size(0);
  const int64_t total = check_new_seqs(ids, n, B, lens.size(0));
  if (tokens.size(0) != total) {
    value_error("tokens has " + std::to_string(tokens.size(0)) + " entries, lens sum to " + std::to_string(total));
  }
  // Plan without touching any state: each logical page is an existing page (a hit) or a new page, numbered in
  // order of first use; a new full page may be shared by later sequences of this call (same chain and tokens).
  struct NewPage { uint64_t hash; const int64_t* tokens; bool full; int64_t parent; };  // parent: plan entry
  std::vector<NewPage> fresh;
  std::unordered_map<uint64_t, int32_t> fresh_by_hash;  // chained hash -> index into fresh
  std::vector<std::vector<int64_t>> plan(B);            // >= 0: existing page, < 0: ~index into fresh
  std::vector<int64_t> cached(B, 0);
  std::unordered_set<int32_t> revived;                  // existing free pages this call takes back
  const int64_t* t = tok;
  for (int64_t i = 0; i < B; t += n[i], ++i) {
    const int64_t full = n[i] / page_size_, reusable = (n[i] - 1) / page_size_;
    uint64_t h = PrefixIndex::kRoot;
    bool hitting = true;
    for (int64_t j = 0; j < pages_for(n[i]); ++j) {
      const int64_t* page_tokens = t + j * page_size_;
      const int64_t parent = j ? plan[i][j - 1] : kRootEntry;
      if (j < full) h = PrefixIndex::chain(h, page_tokens, page_size_);
      if (hitting && j < reusable) {
        // An indexed page can only follow an indexed page or start a sequence: after a new page, skip the index.
        int32_t p = -1;
        if (parent == kRootEntry) p = index_.lookup(h, page_tokens, PrefixIndex::kNoPage);
        if (parent >= 0) p = index_.lookup(h, page_tokens, static_cast<int32_t>(parent));
        if (p >= 0) {
          if (ref_[p] == 0) revived.insert(p);
          plan[i].push_back(p);
          cached[i] += page_size_;
          continue;
        }
        auto f = fresh_by_hash.find(h);
        if (f != fresh_by_hash.end() && fresh[f->second].parent == parent &&
            std::equal(page_tokens, page_tokens + page_size_, fresh[f->second].tokens)) {
          plan[i].push_back(~static_cast<int64_t>(f->second));
          cached[i] += page_size_;
          continue;
        }
        hitting = false;
      }
      if (j < full && !fresh_by_hash.count(h)) fresh_by_hash[h] = static_cast<int32_t>(fresh.size());
      plan[i].push_back(~static_cast<int64_t>(fresh.size()));
      fresh.push_back({h, page_tokens, j < full, parent});
    }
  }
  const int64_t need = static_cast<int64_t>(fresh.size() + revived.size());
  check_free_pages(need, "");
  // Commit: revive first, so taking new pages cannot evict a page this call is about to reuse.
  for (int32_t p : revived) revive(p);
  std::vector<int32_t> fresh_page(fresh.size());
  for (size_t k = 0; k < fresh.size(); ++k) {
    fresh_page[k] = take_page();
    ref_[fresh_page[k]] = 0;  // counted per holder below
  }
  for (size_t k = 0; k < fresh.size(); ++k) {  // a parent always comes before its child in `fresh`
    if (!fresh[k].full) continue;
    const int64_t e = fresh[k].parent;
    const int32_t parent = e == kRootEntry ? PrefixIndex::kNoPage : e >= 0 ? static_cast<int32_t>(e) : fresh_page[~e];
    index_.insert(fresh[k].hash, fresh_page[k], fresh[k].tokens, parent);
  }
  for (int32_t p : revived) ref_[p] = 0;
  at::Tensor slots = int32_tensor({total - std::accumulate(cached.begin(), cached.end(), int64_t{0})});
  at::Tensor cached_out = at::empty({B}, at::TensorOptions().dtype(at::kLong));
  int32_t* out = slots.data_ptr<int32_t>();
  for (int64_t i = 0; i < B; ++i) {
    Sequence& s = seqs_[ids[i]];
    s.num_tokens = n[i];
    s.pages.reserve(plan[i].size() + 1);
    for (int64_t e : plan[i]) {
      const int32_t p = e >= 0 ? static_cast<int32_t>(e) : fresh_page[~e];
      ++ref_[p];
      s.pages.push_back(p);
    }
    for (int64_t k = cached[i]; k < n[i]; ++k) *out++ = slot(s, k);
    cached_out.data_ptr<int64_t>()[i] = cached[i];
  }
  return {slots, cached_out};
}

}  // namespace dash
