// convnn's native CPU kernels.
//
// topk_rows: the k largest entries of every row of a score matrix, best first. torch.topk copies each row into (value, index) pairs and partially sorts them; for the small k of
// ConvNN (k <= 32 of M = 32 ... a few thousand candidates) almost all of that work is wasted. Here a
// row is split into kLanes strided groups (entry j in group j % kLanes) whose maxima are elementwise
// maxima of consecutive kLanes-wide slices (vectorised, no reductions). The k-th largest group
// maximum is a lower bound ("floor") of the row's k-th largest entry, so only the entries >= floor in
// groups whose maximum reaches it are ranked (found by a bit mask per slice), by sorted insertion. Short rows (M <= kRankMax) count
// each entry's rank directly. Ties rank by index (the lower first); NaN ranks above every number, as
// in torch.topk; rows holding NaN or +-inf take an exact scalar path.
//
// index_add_rows: out[index[r]] += src[r] for every row r, in row order (deterministic); threads
// split the columns, never the rows. torch's CPU index_add_ dispatches one kernel per row (~35 ns
// each, 5-6x slower on ConvNN's gather backward of ~300k rows of 64 values).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>

namespace {

constexpr int64_t kLanes = 32;
constexpr int64_t kRankMax = 64;

// (a, ia) ranks before (b, ib): NaN first, then the larger value, then the lower index.
template <typename T>
inline bool ranks_before(T a, int64_t ia, T b, int64_t ib) {
  const bool na = std::isnan(a), nb = std::isnan(b);
  if (na != nb) return na;
  if (!na && a != b) return a > b;
  return ia < ib;
}

// Insert (x, index) into the sorted best-first list v / ix of `filled` <= k entries (the k-th falls
// off when full), given that it ranks before the current k-th entry when the list is full.
template <typename T>
inline void insert(T* v, int64_t* ix, int64_t& filled, int64_t k, T x, int64_t index) {
  int64_t pos = filled < k ? filled++ : k - 1;
  while (pos > 0 && ranks_before(x, index, v[pos - 1], ix[pos - 1])) {
    v[pos] = v[pos - 1];
    ix[pos] = ix[pos - 1];
    --pos;
  }
  v[pos] = x;
  ix[pos] = index;
}

// Any row: one pass of sorted insertion (rows with NaN or infinite entries).
template <typename T>
void select_exact(const T* row, int64_t m, int64_t k, T* v, int64_t* ix) {
  int64_t filled = 0;
  for (int64_t j = 0; j < m; ++j) {
    if (filled == k && !ranks_before(row[j], j, v[k - 1], ix[k - 1])) continue;
    insert(v, ix, filled, k, row[j], j);
  }
}

// Short finite rows: every entry's rank counted directly, all entries at once (vectorised).
template <typename T>
void select_by_rank(const T* row, int64_t m, int64_t k, T* v, int64_t* ix) {
  int32_t rank[kRankMax] = {};
  for (int32_t t = 0; t < m; ++t) {
    const T x = row[t];
    for (int32_t j = 0; j < m; ++j) rank[j] += (x > row[j]) | ((x == row[j]) & (t < j));
  }
  for (int32_t j = 0; j < m; ++j) {
    if (rank[j] < k) {
      v[rank[j]] = row[j];
      ix[rank[j]] = j;
    }
  }
}

// Bit t set where slice[t] >= floor, for t < kLanes (one compare per 16 / 8 floats where the
// compiler targets AVX-512 / AVX2).
template <typename T>
inline uint32_t at_least(const T* slice, T floor) {
  static_assert(kLanes == 32, "the mask holds 32 lanes");
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) {
    const __m512 bound = _mm512_set1_ps(floor);
    const uint32_t low = _mm512_cmp_ps_mask(_mm512_loadu_ps(slice), bound, _CMP_GE_OQ);
    const uint32_t high = _mm512_cmp_ps_mask(_mm512_loadu_ps(slice + 16), bound, _CMP_GE_OQ);
    return low | (high << 16);
  }
#elif defined(__AVX2__)
  if constexpr (std::is_same_v<T, float>) {
    const __m256 bound = _mm256_set1_ps(floor);
    uint32_t bits = 0;
    for (int part = 0; part < 4; ++part) {
      const __m256 ge = _mm256_cmp_ps(_mm256_loadu_ps(slice + 8 * part), bound, _CMP_GE_OQ);
      bits |= static_cast<uint32_t>(_mm256_movemask_ps(ge)) << (8 * part);
    }
    return bits;
  }
#endif
  uint32_t bits = 0;
  for (int64_t t = 0; t < kLanes; ++t) bits |= static_cast<uint32_t>(slice[t] >= floor) << t;
  return bits;
}

template <typename T>
void select_row(const T* row, int64_t m, int64_t k, T* v, int64_t* ix) {
  if (m <= kRankMax) {
    for (int64_t t = 0; t < m; ++t) {
      if (!std::isfinite(row[t])) return select_exact(row, m, k, v, ix);
    }
    return select_by_rank(row, m, k, v, ix);
  }
  // group maxima; `spread` (sum of x - x) turns NaN at any NaN or infinite entry
  alignas(64) T maxima[kLanes];
  alignas(64) T spread[kLanes];
  for (int64_t g = 0; g < kLanes; ++g) {
    maxima[g] = row[g];
    spread[g] = row[g] - row[g];
  }
  int64_t j = kLanes;
  for (; j + kLanes <= m; j += kLanes) {
    const T* slice = row + j;
    for (int64_t g = 0; g < kLanes; ++g) {
      maxima[g] = slice[g] > maxima[g] ? slice[g] : maxima[g];
      spread[g] += slice[g] - slice[g];
    }
  }
  for (int64_t g = 0; j + g < m; ++g) {
    maxima[g] = row[j + g] > maxima[g] ? row[j + g] : maxima[g];
    spread[g] += row[j + g] - row[j + g];
  }
  T total = 0;
  for (int64_t g = 0; g < kLanes; ++g) total += spread[g];
  if (total != total) return select_exact(row, m, k, v, ix);
  // floor: the k-th largest group maximum (k <= kLanes, checked by the caller)
  T top[kLanes];
  int64_t ranked = 0;
  for (int64_t g = 0; g < kLanes; ++g) {
    if (ranked == k && !(maxima[g] > top[k - 1])) continue;
    int64_t pos = ranked < k ? ranked++ : k - 1;
    while (pos > 0 && maxima[g] > top[pos - 1]) {
      top[pos] = top[pos - 1];
      --pos;
    }
    top[pos] = maxima[g];
  }
  const T floor = top[k - 1];
  // rank the entries >= floor in index order (so a tie never displaces an earlier entry), found by a
  // bit mask per kLanes-wide slice
  int64_t filled = 0;
  auto consider = [&](T x, int64_t t) {  // finite, later index than every listed entry
    if (filled == k && !(x > v[k - 1])) return;
    int64_t pos = filled < k ? filled++ : k - 1;
    while (pos > 0 && x > v[pos - 1]) {
      v[pos] = v[pos - 1];
      ix[pos] = ix[pos - 1];
      --pos;
    }
    v[pos] = x;
    ix[pos] = t;
  };
  int64_t start = 0;
  for (; start + kLanes <= m; start += kLanes) {
    const T* slice = row + start;
    uint32_t bits = at_least(slice, floor);
    while (bits) {
      const int64_t t = __builtin_ctz(bits);
      bits &= bits - 1;
      consider(slice[t], start + t);
    }
  }
  for (int64_t t = start; t < m; ++t) {
    if (row[t] >= floor) consider(row[t], t);
  }
}

// scores [R, M] (float32 / float64, unit stride along M) -> (values [R, k], indices [R, k] int64).
std::tuple<at::Tensor, at::Tensor> topk_rows(const at::Tensor& scores, int64_t k) {
  TORCH_CHECK(scores.device().is_cpu() && scores.dim() == 2, "topk_rows needs a 2-d CPU tensor, got ",
              scores.sizes(), " on ", scores.device());
  const auto x = scores.stride(1) == 1 ? scores : scores.contiguous();
  const int64_t rows = x.size(0), m = x.size(1), stride = x.stride(0);
  TORCH_CHECK(k >= 1 && k <= m && k <= kLanes, "topk_rows needs 1 <= k <= min(", kLanes, ", ", m,
              "), got k=", k);
  auto values = at::empty({rows, k}, x.options());
  auto indices = at::empty({rows, k}, x.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "topk_rows", [&] {
    const scalar_t* src = x.const_data_ptr<scalar_t>();
    scalar_t* out_v = values.mutable_data_ptr<scalar_t>();
    int64_t* out_i = indices.mutable_data_ptr<int64_t>();
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        select_row(src + r * stride, m, k, out_v + r * k, out_i + r * k);
      }
    });
  });
  return {values, indices};
}

// out [L, C] += rows src [R, C] at index [R] (int64), all contiguous.
void index_add_rows(at::Tensor& out, const at::Tensor& index, const at::Tensor& src) {
  TORCH_CHECK(out.device().is_cpu() && out.dim() == 2 && out.is_contiguous(),
              "index_add_rows needs a contiguous 2-d CPU out, got ", out.sizes());
  TORCH_CHECK(src.dim() == 2 && src.size(1) == out.size(1) && src.scalar_type() == out.scalar_type(),
              "index_add_rows needs src [R, ", out.size(1), "] of out's dtype, got ", src.sizes());
  TORCH_CHECK(index.dim() == 1 && index.size(0) == src.size(0) && index.scalar_type() == at::kLong,
              "index_add_rows needs an int64 index [", src.size(0), "], got ", index.sizes());
  const auto rows_in = src.contiguous();
  const auto idx = index.contiguous();
  const int64_t rows = idx.size(0), length = out.size(0), c = out.size(1);
  const int64_t* ix = idx.const_data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r) {
    TORCH_CHECK(ix[r] >= 0 && ix[r] < length, "index_add_rows: index ", ix[r], " out of range [0, ", length, ")");
  }
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t width = std::max<int64_t>(16, ((c + threads - 1) / threads + 15) / 16 * 16);
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "index_add_rows", [&] {
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    const scalar_t* from = rows_in.const_data_ptr<scalar_t>();
    at::parallel_for(0, (c + width - 1) / width, 1, [&](int64_t begin, int64_t end) {
      const int64_t first = begin * width, last = std::min(c, end * width);
      for (int64_t r = 0; r < rows; ++r) {
        scalar_t* to = dst + ix[r] * c;
        const scalar_t* add = from + r * c;
        for (int64_t j = first; j < last; ++j) to[j] += add[j];
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY(convnn_native, m) {
  m.def("topk_rows(Tensor scores, int k) -> (Tensor, Tensor)");
  m.def("index_add_rows(Tensor(a!) out, Tensor index, Tensor src) -> ()");
}

TORCH_LIBRARY_IMPL(convnn_native, CPU, m) {
  m.impl("topk_rows", &topk_rows);
  m.impl("index_add_rows", &index_add_rows);
}
