// The layout's index values, checked on the host before any kernel dereferences them: shared by the CPU glue
// (csrc/cpu) and the CUDA glue (csrc/cuda, which copies the small layout tensors to the host once per call).
//
// A direct call of the registered op with crafted layout tensors must raise instead of reading out of bounds or
// letting two tasks write one row, and it must never compute something other than the mask the ids define: so
// every segment is one run whose tokens all name it, and each group's token list holds each of its tokens once.
// O(B * L log L), tiny next to the attention itself. Layout contract: clear_kernels/layout.py.
#pragma once

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace clear_layout {

struct LayoutPointers {
  int64_t batch = 0, length = 0, num_groups = 0, max_summary = 0;
  const int32_t* segment = nullptr;
  const int32_t* group = nullptr;
  const int32_t* seg_start = nullptr;
  const int32_t* seg_end = nullptr;
  const int32_t* group_index = nullptr;
  const int32_t* group_offsets = nullptr;
  const int32_t* summary_index = nullptr;
  const int32_t* summary_offsets = nullptr;
};

struct LayoutStats {
  int64_t max_run = 1;            // longest segment run
  int64_t max_group_summary = 0;  // most summary tokens in one group
};

// `who` prefixes every message (the backend's name).
inline LayoutStats check_layout_values(const LayoutPointers& p, const char* who) {
  const int64_t L = p.length, G = p.num_groups, S = p.max_summary;
  LayoutStats stats;
  std::vector<int32_t> run_ids;
  for (int64_t b = 0; b < p.batch; ++b) {
    const int32_t* seg = p.segment + b * L;
    const int32_t* grp = p.group + b * L;
    const int32_t* start = p.seg_start + b * L;
    const int32_t* end = p.seg_end + b * L;
    int64_t summaries = 0, real = 0;
    int64_t run_start = 0, run_end = 0;  // the run the scan is inside: [run_start, run_end)
    run_ids.clear();
    for (int64_t t = 0; t < L; ++t) {
      TORCH_CHECK(seg[t] >= -2, who, ": segment[", b, ", ", t, "] = ", seg[t], " is below -2");
      TORCH_CHECK(grp[t] >= 0 && grp[t] < G, who, ": group[", b, ", ", t, "] = ", grp[t],
                  " is outside [0, num_groups=", G, ")");
      real += seg[t] != -2;
      if (t < run_end) {  // every token of a run names the run's segment and bounds: runs never overlap
        TORCH_CHECK(seg[t] == seg[run_start] && start[t] == run_start && end[t] == run_end, who, ": token [", b,
                    ", ", t, "] lies inside the run [", run_start, ", ", run_end, ") of segment ", seg[run_start],
                    " but has segment ", seg[t], " and run [", start[t], ", ", end[t], ") (overlapping runs)");
        continue;
      }
      if (seg[t] < 0) {
        TORCH_CHECK(start[t] == t && end[t] == t, who, ": seg_start/seg_end of summary or padding token [", b, ", ",
                    t, "] must both equal ", t);
        summaries += seg[t] == -1;
        continue;
      }
      TORCH_CHECK(start[t] <= t && t < end[t] && end[t] <= L, who, ": seg_start/seg_end [", start[t], ", ", end[t],
                  ") of token [", b, ", ", t, "] do not contain it");
      TORCH_CHECK(start[t] == t, who, ": token [", b, ", ", t, "] names the run [", start[t], ", ", end[t],
                  ") but the run of the token before it ends before it");
      TORCH_CHECK(t == 0 || seg[t - 1] != seg[t], who, ": segment ", seg[t], " is split into two runs at [", b, ", ",
                  t, "]; a segment must be one run");
      run_start = t;
      run_end = end[t];
      run_ids.push_back(seg[t]);
      stats.max_run = std::max<int64_t>(stats.max_run, run_end - run_start);
    }
    std::sort(run_ids.begin(), run_ids.end());
    const auto repeated = std::adjacent_find(run_ids.begin(), run_ids.end());
    TORCH_CHECK(repeated == run_ids.end(), who, ": segment ", repeated == run_ids.end() ? 0 : *repeated,
                " of row ", b, " has two runs; a segment must be one run");

    const int32_t* goff = p.group_offsets + b * (G + 1);
    const int32_t* soff = p.summary_offsets + b * (G + 1);
    TORCH_CHECK(goff[0] == 0 && soff[0] == 0, who, ": group_offsets and summary_offsets must start at 0");
    for (int64_t g = 0; g < G; ++g) {
      stats.max_group_summary = std::max<int64_t>(stats.max_group_summary, soff[g + 1] - soff[g]);
      TORCH_CHECK(goff[g] <= goff[g + 1] && goff[g + 1] <= L, who, ": group_offsets[", b,
                  "] must be non-decreasing and <= L=", L);
      TORCH_CHECK(soff[g] <= soff[g + 1] && soff[g + 1] <= S, who, ": summary_offsets[", b,
                  "] must be non-decreasing and <= max_summary=", S);
      // Members of the group, ascending (so none twice); with the totals below, each list is complete.
      for (int64_t i = goff[g]; i < goff[g + 1]; ++i) {
        const int32_t x = p.group_index[b * L + i];
        TORCH_CHECK(x >= 0 && x < L && seg[x] != -2 && grp[x] == g, who, ": group_index[", b, ", ", i, "] = ", x,
                    " is not a non-padding token of group ", g);
        TORCH_CHECK(i == goff[g] || p.group_index[b * L + i - 1] < x, who, ": group_index[", b,
                    "] must be ascending within a group");
      }
      for (int64_t i = soff[g]; i < soff[g + 1]; ++i) {
        const int32_t x = p.summary_index[b * S + i];
        TORCH_CHECK(x >= 0 && x < L && seg[x] == -1 && grp[x] == g, who, ": summary_index[", b, ", ", i, "] = ", x,
                    " is not a summary token of group ", g);
        TORCH_CHECK(i == soff[g] || p.summary_index[b * S + i - 1] < x, who, ": summary_index[", b,
                    "] must be ascending within a group");
      }
    }
    TORCH_CHECK(goff[G] == real, who, ": group_offsets[", b, "] lists ", goff[G], " tokens but segment holds ", real,
                " non-padding tokens");
    TORCH_CHECK(soff[G] == summaries, who, ": summary_offsets[", b, "] lists ", soff[G],
                " summary tokens but segment holds ", summaries);
  }
  return stats;
}

}  // namespace clear_layout
