// convnn's native CPU kernels.
//
// topk_rows: the k largest entries of every row of a score matrix, best first. torch.topk copies each
// row into (value, index) pairs and partially sorts them; for the small k of ConvNN (k <= 32 of M = 32
// ... a few thousand candidates) almost all of that work is wasted. Here a row is split into kLanes
// strided groups (entry j in group j % kLanes) whose maxima are elementwise maxima of consecutive
// kLanes-wide slices (vectorised, no reductions). The k-th largest group maximum is a lower bound
// ("floor") of the row's k-th largest entry, so only the entries >= floor in groups whose maximum
// reaches it are ranked (found by a bit mask per slice), by sorted insertion. Short rows (M <=
// kRankMax) rank each entry by counting the larger ones, all entries at once (float32 rows of M <= 32
// held in four AVX2 registers). Ties rank by index (the lower first); NaN ranks above every number, as
// in torch.topk; rows holding NaN or +-inf take an exact scalar path.
//
// index_add_rows: out[index[r]] += src[r] for every row r, in row order (deterministic); threads
// own interleaved blocks of output rows, never input rows, so every output row receives its rows in
// order at any thread count. torch's CPU index_add_ dispatches one kernel per row (~35 ns each, 5-6x
// slower on ConvNN's gather backward of ~300k rows of 64 values).
//
// The step kernels (select_chunks, gather_aggregate, gather_scaled_sum, selected_pairs_grad and their
// backward passes) run the k-NN core's cache-sized chunks / token steps on all intra-op threads at
// once: each chunk or step is one work item on one thread (its library calls, oneDNN and BLAS, run
// single-threaded inside the parallel region), so an item computes the same bits whatever the thread
// count. What several steps add into one tensor (an index-add, a weight gradient) is added by the
// thread that computed the step, one step at a time in step order, while the other threads compute.
// Results are bitwise identical at every thread count, and to the Python loops of convnn/knn/ops.py
// and selection.py that they stand in for, except the aggregation's float32 forward on AVX2 builds
// (tiled_product sums in its own order: equal to the loops' oneDNN product within float32 rounding).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <thread>
#include <tuple>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kLanes = 32;
constexpr int64_t kRankMax = 64;
// oneDNN runs a 1x1 convolution well from a batch of 16 images (convnn/knn/ops.py: CONV_BATCH)
constexpr int64_t kConvBatch = 16;
// index_add_rows: output rows per block a thread owns (interleaved, so any index pattern spreads)
constexpr int64_t kOwnedRows = 16;

// (a, ia) ranks before (b, ib): NaN first, then the larger value, then the lower index.
template <typename T>
inline bool ranks_before(T a, int64_t ia, T b, int64_t ib) {
  const bool na = std::isnan(a), nb = std::isnan(b);
  if (na != nb) return na;
  if (!na && a != b) return a > b;
  return ia < ib;
}

// Insert (x, index) into the list v / ix of `filled` <= k entries, sorted best first by `before(x,
// index, y, other)` (the k-th falls off when full), given that it ranks before the current k-th entry
// when the list is full.
template <typename T, typename Before>
inline void insert(T* v, int64_t* ix, int64_t& filled, int64_t k, T x, int64_t index, const Before& before) {
  int64_t pos = filled < k ? filled++ : k - 1;
  while (pos > 0 && before(x, index, v[pos - 1], ix[pos - 1])) {
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
    insert(v, ix, filled, k, row[j], j, ranks_before<T>);
  }
}

// Offer the finite entry (x, index) to the sorted best-first list v / ix of `filled` <= k entries,
// all of lower index than `index`: it enters where it ranks before the k-th (a tie keeps the earlier).
template <typename T>
inline void consider(T x, int64_t index, T* v, int64_t* ix, int64_t& filled, int64_t k) {
  if (filled == k && !(x > v[k - 1])) return;
  insert(v, ix, filled, k, x, index, [](T a, int64_t, T b, int64_t) { return a > b; });
}

// Place the entries j of a short row set in `below` (those of rank larger[j] < k; larger[j]: the count
// of larger entries) at their ranks; a tie inside the top k (two entries of one rank) falls back to
// select_exact, which ranks the lower index first.
template <typename T, typename Count>
void place_ranks(const T* row, int64_t m, int64_t k, const Count* larger, uint64_t below, T* v, int64_t* ix) {
  uint64_t taken = 0;
  for (; below; below &= below - 1) {
    const int64_t j = __builtin_ctzll(below);
    const auto rank = static_cast<int64_t>(larger[j]);
    if (taken >> rank & 1) return select_exact(row, m, k, v, ix);
    taken |= uint64_t(1) << rank;
    v[rank] = row[j];
    ix[rank] = j;
  }
}

// Short finite rows: each entry's rank = the count of larger entries, counted for all entries at once
// (vectorised compares).
template <typename T>
void select_short(const T* row, int64_t m, int64_t k, T* v, int64_t* ix) {
  alignas(64) T larger[kRankMax] = {};
  for (int64_t t = 0; t < m; ++t) {
    const T x = row[t];
    for (int64_t j = 0; j < m; ++j) larger[j] += x > row[j] ? T(1) : T(0);
  }
  uint64_t below = 0;
  for (int64_t j = 0; j < m; ++j) below |= uint64_t(larger[j] < T(k)) << j;
  place_ranks(row, m, k, larger, below, v, ix);
}

#if defined(__AVX2__)
constexpr int64_t kRegisterRow = 32;

// Lanes i < n of 8 set.
inline __m256i lanes_below(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::clamp<int64_t>(n, 0, 8))),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// A float32 row of m <= 32 entries held in four registers: larger[j] = the count of entries larger than
// row[j], and bit j of the result set where that count is below k; nullopt where the row holds NaN or
// +-inf.
inline std::optional<uint32_t> count_larger(const float* row, int64_t m, int64_t k, int32_t* larger) {
  __m256 entries[4];
  __m256i counts[4];
  __m256 spread = _mm256_setzero_ps();  // x - x: NaN at a NaN or infinite entry
  for (int q = 0; q < 4; ++q) {
    entries[q] = _mm256_maskload_ps(row + 8 * q, lanes_below(m - 8 * q));
    spread = _mm256_add_ps(spread, _mm256_sub_ps(entries[q], entries[q]));
    counts[q] = _mm256_setzero_si256();
  }
  if (_mm256_movemask_ps(_mm256_cmp_ps(spread, spread, _CMP_UNORD_Q))) return std::nullopt;
  for (int64_t t = 0; t < m; ++t) {
    const __m256 x = _mm256_set1_ps(row[t]);
    for (int q = 0; q < 4; ++q) {  // a true compare is -1
      counts[q] = _mm256_sub_epi32(counts[q], _mm256_castps_si256(_mm256_cmp_ps(x, entries[q], _CMP_GT_OQ)));
    }
  }
  const __m256i picks = _mm256_set1_epi32(static_cast<int>(k));
  uint32_t below = 0;
  for (int q = 0; q < 4; ++q) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(larger + 8 * q), counts[q]);
    const __m256i in_top = _mm256_cmpgt_epi32(picks, counts[q]);
    below |= static_cast<uint32_t>(_mm256_movemask_ps(_mm256_castsi256_ps(in_top))) << (8 * q);
  }
  return m < kRegisterRow ? below & ((uint32_t(1) << m) - 1) : below;
}
#endif

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
#if defined(__AVX2__)
  if constexpr (std::is_same_v<T, float>) {
    if (m <= kRegisterRow) {
      alignas(32) int32_t larger[kRegisterRow];
      const auto below = count_larger(row, m, k, larger);
      if (!below) return select_exact(row, m, k, v, ix);
      return place_ranks(row, m, k, larger, *below, v, ix);
    }
  }
#endif
  if (m <= kRankMax) {
    for (int64_t t = 0; t < m; ++t) {
      if (!std::isfinite(row[t])) return select_exact(row, m, k, v, ix);
    }
    return select_short(row, m, k, v, ix);
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
  int64_t start = 0;
  for (; start + kLanes <= m; start += kLanes) {
    const T* slice = row + start;
    uint32_t bits = at_least(slice, floor);
    while (bits) {
      const int64_t t = __builtin_ctz(bits);
      bits &= bits - 1;
      consider(slice[t], start + t, v, ix, filled, k);
    }
  }
  for (int64_t t = start; t < m; ++t) {
    if (row[t] >= floor) consider(row[t], t, v, ix, filled, k);
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

// ---- work distribution ------------------------------------------------------------------------

// The intra-op threads this process uses here (1 inside a parallel region).
int64_t thread_count() { return at::in_parallel_region() ? 1 : std::max<int64_t>(1, at::get_num_threads()); }

// work(item, slot) for every item in [0, items), each on one thread, taken in order from a shared
// counter (a thread that runs late takes fewer); `slot` < min(items, thread_count()) is the thread's
// own (for its buffers). With more than one thread it always runs inside a parallel region, so library
// calls in `work` run single-threaded and an item computes the same bits at every thread count.
// Autograd is off in `work` (the tensors may require grad; the work threads do not share the caller's
// grad mode).
template <typename F>
void for_each_item(int64_t items, const F& work) {
  const int64_t threads = thread_count();
  if (threads == 1) {
    at::NoGradGuard no_grad;
    for (int64_t item = 0; item < items; ++item) work(item, 0);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t slot, int64_t) {
    if (slot >= items) return;
    at::NoGradGuard no_grad;
    for (int64_t item = next++; item < items; item = next++) work(item, slot);
  });
}

// compute(step, slot) for every step in [0, steps) (for_each_item), then merge(step, slot) on the same
// thread once every earlier step has merged: merges run one at a time in step order, each while the
// step's results are still in its thread's cache and while the other threads compute. A failure in
// one step ends the waits of the others, and for_each_item rethrows it.
template <typename C, typename M>
void in_step_order(int64_t steps, const C& compute, const M& merge) {
  std::atomic<int64_t> merged{0};
  std::atomic<bool> failed{false};
  for_each_item(steps, [&](int64_t i, int64_t slot) {
    if (failed.load()) return;
    try {
      compute(i, slot);
      while (merged.load(std::memory_order_acquire) != i) {
        if (failed.load()) return;
        std::this_thread::yield();
      }
      merge(i, slot);
      merged.store(i + 1, std::memory_order_release);
    } catch (...) {
      failed = true;
      throw;
    }
  });
}

// out[index[r]] += src[r] for the rows r of index [R] (int64) and src [R, C], in order; each thread
// owns the output rows of every thread_count()-th block of kOwnedRows rows, so each output row
// receives its rows in order whatever the thread count. The indices are in range (the callers
// gathered rows by them or checked them).
void add_rows(at::Tensor& out, const at::Tensor& index, const at::Tensor& src) {
  const int64_t c = out.size(1), rows = index.numel();
  const int64_t owners = rows * c >= (1 << 15) ? thread_count() : 1;  // small: one thread
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "add_rows", [&] {
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    const int64_t* ix = index.const_data_ptr<int64_t>();
    const scalar_t* from = src.const_data_ptr<scalar_t>();
    auto own = [&](int64_t owner) {
      for (int64_t r = 0; r < rows; ++r) {
        if (owners > 1 && (ix[r] / kOwnedRows) % owners != owner) continue;
        scalar_t* to = dst + ix[r] * c;
        const scalar_t* add = from + r * c;
        for (int64_t j = 0; j < c; ++j) to[j] += add[j];
      }
    };
    if (owners == 1) return own(0);
    at::parallel_for(0, owners, 1, [&](int64_t owner, int64_t) { own(owner); });
  });
}

void check_rows(const at::Tensor& index, int64_t length, const char* op) {
  if (index.numel() == 0) return;
  const int64_t low = index.min().item<int64_t>(), high = index.max().item<int64_t>();
  TORCH_CHECK(low >= 0 && high < length, op, ": index ", low < 0 ? low : high, " out of range [0, ",
              length, ")");
}

// out [L, C] += rows src [R, C] at index [R] (int64), all contiguous.
void index_add_rows(at::Tensor& out, const at::Tensor& index, const at::Tensor& src) {
  TORCH_CHECK(out.device().is_cpu() && out.dim() == 2 && out.is_contiguous(),
              "index_add_rows needs a contiguous 2-d CPU out, got ", out.sizes());
  TORCH_CHECK(src.dim() == 2 && src.size(1) == out.size(1) && src.scalar_type() == out.scalar_type(),
              "index_add_rows needs src [R, ", out.size(1), "] of out's dtype, got ", src.sizes());
  TORCH_CHECK(index.dim() == 1 && index.size(0) == src.size(0) && index.scalar_type() == at::kLong,
              "index_add_rows needs an int64 index [", src.size(0), "], got ", index.sizes());
  check_rows(index, out.size(0), "index_add_rows");
  add_rows(out, index.contiguous(), src.contiguous());
}

// The parts [first, first + step) of [0, total): (first, stop) of part `i`.
std::pair<int64_t, int64_t> part(int64_t i, int64_t step, int64_t total) {
  return {i * step, std::min(total, (i + 1) * step)};
}

// out [L, c] += the gathered rows' gradients of token step i (of `step` tokens) at its rows of flat
// [T, k]; `rows` holds them at its front ([the step's tokens * k, c]).
void add_step_rows(at::Tensor& out, const at::Tensor& flat, const at::Tensor& rows, int64_t i,
                   int64_t step) {
  const auto [start, stop] = part(i, step, flat.size(0));
  const auto index = flat.narrow(0, start, stop - start).reshape(-1);
  add_rows(out, index, rows.view({-1, out.size(1)}).narrow(0, 0, index.numel()));
}

// Per-thread buffers [threads, rows, width] of `like`'s dtype.
at::Tensor slots_of(const at::Tensor& like, int64_t threads, int64_t rows, int64_t width) {
  return at::empty({threads, rows, width}, like.options());
}

// ---- the aggregation's forward product (AVX2 builds) -------------------------------------------
//
// out [S, C'] = rows [S, F] @ columns [F, C'] (+ out): a register-tiled kernel, 6 x 16 output tiles
// held in 12 registers, the rows' entries broadcast and the columns' rows loaded 16 wide. On AVX2 CPUs
// it runs the aggregation's forward about 10% faster than oneDNN's 1x1 convolution (the backward's
// GEMMs are as fast in MKL). AVX-512 builds keep oneDNN's kernels. Its summation order depends on the
// shapes only: the same bits at every thread count.
#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
constexpr bool kTiledProduct = true;
constexpr int64_t kTileRows = 6, kTileCols = 16;
// values of `columns` per depth pass (256 KiB: half the per-core L2 of current x86 cores)
constexpr int64_t kColumnBlock = 1 << 16;

// The tile out [R, cols <= 16] (row stride n) += rows [R, depth] (row stride f) @ columns [depth, cols]
// (row stride n); Full: cols == 16 (no masked loads and stores).
template <int R, bool Full>
void product_tile(const float* rows, const float* columns, float* out, int64_t f, int64_t n, int64_t depth,
                  int64_t cols) {
  const __m256i lo = lanes_below(cols), hi = lanes_below(cols - 8);
  auto load = [&](const float* p, __m256i mask) {
    return Full ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, mask);
  };
  __m256 acc[R][2];
  _Pragma("GCC unroll 8") for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t p = 0; p < depth; ++p) {
    const __m256 b0 = load(columns + p * n, lo), b1 = load(columns + p * n + 8, hi);
    _Pragma("GCC unroll 8") for (int r = 0; r < R; ++r) {
      const __m256 x = _mm256_broadcast_ss(rows + r * f + p);
      acc[r][0] = _mm256_fmadd_ps(x, b0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(x, b1, acc[r][1]);
    }
  }
  _Pragma("GCC unroll 8") for (int r = 0; r < R; ++r) {
    float* o = out + r * n;
    const __m256 x0 = _mm256_add_ps(load(o, lo), acc[r][0]), x1 = _mm256_add_ps(load(o + 8, hi), acc[r][1]);
    if (Full) {
      _mm256_storeu_ps(o, x0);
      _mm256_storeu_ps(o + 8, x1);
    } else {
      _mm256_maskstore_ps(o, lo, x0);
      _mm256_maskstore_ps(o + 8, hi, x1);
    }
  }
}

template <int R>
void product_rows(const float* rows, const float* columns, float* out, int64_t f, int64_t n, int64_t depth,
                  int64_t cols) {
  if (cols == kTileCols) return product_tile<R, true>(rows, columns, out, f, n, depth, cols);
  product_tile<R, false>(rows, columns, out, f, n, depth, cols);
}

// out [s, n] += rows [s, f] @ columns [f, n], all contiguous float32, in passes over the depth whose
// block of columns (kColumnBlock values) stays in the per-core cache; within a pass a tile of rows
// meets every tile of columns while it is in cache.
void tiled_product(const at::Tensor& rows, const at::Tensor& columns, at::Tensor& out) {
  const int64_t s = rows.size(0), f = rows.size(1), n = columns.size(1);
  const int64_t block = std::max<int64_t>(8, kColumnBlock / n);
  const float* a = rows.const_data_ptr<float>();
  const float* b = columns.const_data_ptr<float>();
  float* c = out.data_ptr<float>();
  for (int64_t p = 0; p < f; p += block) {
    const int64_t depth = std::min(block, f - p);
    for (int64_t i = 0; i < s; i += kTileRows) {
      for (int64_t j = 0; j < n; j += kTileCols) {
        const float *ai = a + i * f + p, *bj = b + p * n + j;
        float* cij = c + i * n + j;
        const int64_t cols = std::min(kTileCols, n - j);
        switch (std::min(kTileRows, s - i)) {
          case 6: product_rows<6>(ai, bj, cij, f, n, depth, cols); break;
          case 5: product_rows<5>(ai, bj, cij, f, n, depth, cols); break;
          case 4: product_rows<4>(ai, bj, cij, f, n, depth, cols); break;
          case 3: product_rows<3>(ai, bj, cij, f, n, depth, cols); break;
          case 2: product_rows<2>(ai, bj, cij, f, n, depth, cols); break;
          default: product_rows<1>(ai, bj, cij, f, n, depth, cols);
        }
      }
    }
  }
}
#else
constexpr bool kTiledProduct = false;
void tiled_product(const at::Tensor&, const at::Tensor&, at::Tensor&) {
  TORCH_CHECK(false, "tiled_product needs an AVX2 build");
}
#endif

// ---- selection --------------------------------------------------------------------------------

// `rows [S, F] @ weight [C', F]^T + bias -> [S, C']` as convnn/knn/ops.py's _rows_conv: a oneDNN 1x1
// convolution over the channels-last view [16, F, S / 16, 1] when S is a multiple of 16, else linear.
at::Tensor rows_conv(const at::Tensor& rows, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  const int64_t s = rows.size(0), f = rows.size(1);
  if (s % kConvBatch) return at::linear(rows, weight, bias);
  const auto view = rows.view({kConvBatch, s / kConvBatch, 1, f}).permute({0, 3, 1, 2});
  const auto out = at::conv2d(view, weight.view({weight.size(0), f, 1, 1}), bias);
  return out.permute({0, 2, 3, 1}).reshape({s, -1});
}

// The top-`picks` keys of every query row, chunk by chunk (convnn/knn/selection.py: _select on the
// oneDNN / BLAS path). q [B, N, h] prepared query rows (float32), keys [B, M', h] prepared keys
// zero-padded to a multiple of 16 rows (m real), ids [N] token index of each query, starts: the
// chunks' first query. Chunks of a multiple of 16 queries are scored by rows_conv (`onednn`) or the
// GEMM, a short tail by matmul; `dot` divides the scores by sqrt(h). self_first: all candidates
// (candidates None) -> own [B, N] = the query's own score, then masked; with candidates, the query's
// own candidate entries are masked. Returns (values [B, N, picks], positions [B, N, picks], own [B, N]
// or [0]).
std::tuple<at::Tensor, at::Tensor, at::Tensor> select_chunks(
    const at::Tensor& q, const at::Tensor& keys, int64_t m, const at::Tensor& ids, int64_t picks, bool dot,
    const std::optional<at::Tensor>& candidates, bool self_first, at::IntArrayRef starts, bool onednn) {
  TORCH_CHECK(q.dim() == 3 && keys.dim() == 3 && q.scalar_type() == at::kFloat &&
                  keys.scalar_type() == at::kFloat && keys.size(1) % kConvBatch == 0 && m <= keys.size(1),
              "select_chunks needs float32 q [B, N, h] and keys [B, M', h] (M' a multiple of 16), got ",
              q.sizes(), " and ", keys.sizes());
  TORCH_CHECK(picks >= 1 && picks <= kLanes && picks <= m, "select_chunks needs 1 <= picks <= ", kLanes);
  const int64_t batch = q.size(0), n = q.size(1), h = q.size(2);
  const auto id = ids.contiguous();
  const int64_t* token = id.const_data_ptr<int64_t>();
  const bool own_entry = self_first && !candidates.has_value();
  auto values = at::empty({batch, n, picks}, q.options());
  auto positions = at::empty({batch, n, picks}, q.options().dtype(at::kLong));
  auto own = at::empty({own_entry ? batch : 0, n}, q.options());
  at::Tensor cand;
  if (candidates.has_value()) cand = candidates->contiguous();
  const float lowest = std::numeric_limits<float>::lowest();
  const double root = std::sqrt(static_cast<double>(h));
  const int64_t chunks = static_cast<int64_t>(starts.size());
  int64_t widest = 0;  // the longest chunk
  for (int64_t c = 0; c < chunks; ++c) widest = std::max(widest, (c + 1 < chunks ? starts[c + 1] : n) - starts[c]);
  // the GEMM's scores go into a buffer per thread, reused by its chunks (a fresh one per chunk costs
  // its page faults again)
  auto buffers = onednn ? at::Tensor() : slots_of(q, std::min(thread_count(), batch * chunks), widest, keys.size(1));
  for_each_item(batch * chunks, [&](int64_t item, int64_t slot) {
    const int64_t b = item / chunks, c = item % chunks;
    const int64_t start = starts[c], stop = c + 1 < chunks ? starts[c + 1] : n, rows = stop - start;
    const auto query = q.select(0, b).narrow(0, start, rows);
    at::Tensor scores;  // [rows, >= m], unit stride along the keys
    if (rows % kConvBatch == 0) {
      if (onednn) {
        scores = rows_conv(query, keys.select(0, b), std::nullopt);
      } else {
        scores = buffers[slot].narrow(0, 0, rows);
        at::mm_out(scores, query, keys.select(0, b).t());
      }
      if (dot) scores.div_(root);
    } else {
      scores = at::matmul(query.unsqueeze(0), keys.narrow(0, b, 1).narrow(1, 0, m).transpose(-1, -2))[0];
      if (dot) scores = scores / root;
    }
    float* s = scores.data_ptr<float>();
    const int64_t stride = scores.stride(0);
    float* out_v = values.data_ptr<float>() + (b * n + start) * picks;
    int64_t* out_i = positions.data_ptr<int64_t>() + (b * n + start) * picks;
    for (int64_t r = 0; r < rows; ++r) {
      float* row = s + r * stride;
      const int64_t self = token[start + r];
      if (own_entry) {
        own.data_ptr<float>()[b * n + start + r] = row[self];
        row[self] = lowest;
      } else if (self_first) {
        const int64_t* cs = cand.const_data_ptr<int64_t>();
        for (int64_t j = 0; j < m; ++j) {
          if (cs[j] == self) row[j] = lowest;
        }
      }
      select_row(row, m, picks, out_v + r * picks, out_i + r * picks);
    }
  });
  return {values, positions, own};
}

// ---- aggregation steps ------------------------------------------------------------------------


// convnn::gather_aggregate (convnn/knn/ops.py): out [T, C'] = rows_conv(scale * v_rows[flat], weight,
// bias) in steps of `step` tokens (float32 on AVX2 builds: by tiled_product). v_rows [L, C], flat [T, k],
// weight [C', k C], scale [T, k] or None.
at::Tensor gather_aggregate(const at::Tensor& v_rows, const at::Tensor& flat, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& scale,
                            int64_t step) {
  const int64_t tokens = flat.size(0), k = flat.size(1), c = v_rows.size(1);
  auto out = at::empty({tokens, weight.size(0)}, v_rows.options());
  const int64_t steps = (tokens + step - 1) / step;
  auto buffers = slots_of(v_rows, std::min(thread_count(), steps), std::min(step, tokens) * k, c);
  const bool tiled = kTiledProduct && v_rows.scalar_type() == at::kFloat;
  const auto columns = tiled ? weight.t().contiguous() : at::Tensor();  // [k C, C']
  for_each_item(steps, [&](int64_t i, int64_t slot) {
    const auto [first, stop] = part(i, step, tokens);
    const auto index = flat.narrow(0, first, stop - first);
    auto rows = buffers[slot].narrow(0, 0, index.numel());
    at::index_select_out(rows, v_rows, 0, index.reshape(-1));
    auto token_rows = rows.view({stop - first, k, c});
    if (scale.has_value()) token_rows.mul_(scale->narrow(0, first, stop - first).unsqueeze(-1));
    auto result = out.narrow(0, first, stop - first);
    const auto step_rows = rows.view({stop - first, k * c});
    if (!tiled) return void(result.copy_(rows_conv(step_rows, weight, bias)));
    if (bias.has_value()) {
      result.copy_(bias->expand_as(result));
    } else {
      result.zero_();
    }
    tiled_product(step_rows, columns, result);
  });
  return out;
}

// Gradients of rows_conv for grad [S, C'] into grad_rows [S, F] and (weight_grad) weight' [C', F]: by
// oneDNN's convolution backward (`onednn`, S a multiple of 16) or two GEMMs (convnn/knn/ops.py:
// _rows_conv_backward).
void rows_conv_backward(const at::Tensor& rows, const at::Tensor& weight, const at::Tensor& grad,
                        at::Tensor& grad_rows, at::Tensor& grad_weight, bool weight_grad, bool onednn) {
  const int64_t s = rows.size(0), f = rows.size(1);
  if (s % kConvBatch || !onednn) {
    at::mm_out(grad_rows, grad, weight);
    if (weight_grad) at::mm_out(grad_weight, grad.t(), rows);
    return;
  }
  auto view = [](const at::Tensor& t) {
    return t.view({kConvBatch, t.size(0) / kConvBatch, 1, t.size(1)}).permute({0, 3, 1, 2});
  };
  const auto [conv_grad_rows, conv_grad_weight, unused] = at::convolution_backward(
      view(grad), view(rows), weight.view({weight.size(0), f, 1, 1}), std::nullopt, {1, 1}, {0, 0}, {1, 1},
      false, {0, 0}, 1, {true, weight_grad, false});
  grad_rows.copy_(conv_grad_rows.permute({0, 2, 3, 1}).reshape({s, f}));
  if (weight_grad) grad_weight.copy_(conv_grad_weight.view(weight.sizes()));
}

// Gradients of gather_aggregate for grad [T, C']: (v_rows' [L, C], weight' [C', k C], scale' [T, k]),
// each empty where not asked for (scale' also without scale); the conv's gradients per step by
// rows_conv_backward (`onednn`), the weight's summed over the steps in order.
std::tuple<at::Tensor, at::Tensor, at::Tensor> gather_aggregate_backward(
    const at::Tensor& grad, const at::Tensor& v_rows, const at::Tensor& flat, const at::Tensor& weight,
    const std::optional<at::Tensor>& scale, bool rows_grad, bool weight_grad, bool scale_grad, int64_t step,
    bool onednn) {
  const int64_t tokens = flat.size(0), k = flat.size(1), c = v_rows.size(1), out_c = weight.size(0);
  scale_grad = scale_grad && scale.has_value();
  auto grad_v = rows_grad ? at::zeros(v_rows.sizes(), v_rows.options()) : v_rows.new_empty({0});
  auto grad_w = weight_grad ? at::zeros_like(weight) : weight.new_empty({0});
  auto grad_s = scale_grad ? at::empty({tokens, k}, v_rows.options()) : v_rows.new_empty({0});
  const int64_t steps = (tokens + step - 1) / step, slots = std::min(thread_count(), steps);
  const int64_t width = std::min(step, tokens) * k;
  auto rows_of = slots_of(v_rows, slots, width, c);
  auto scaled_of = scale.has_value() ? slots_of(v_rows, slots, width, c) : at::Tensor();
  auto grad_rows_of = slots_of(v_rows, slots, std::min(step, tokens), k * c);
  auto weight_of = weight_grad ? slots_of(weight, slots, out_c, k * c) : at::Tensor();
  auto compute = [&](int64_t i, int64_t slot) {
    const auto [first, stop] = part(i, step, tokens);
    const int64_t size = stop - first;
    auto rows = rows_of[slot].narrow(0, 0, size * k);
    at::index_select_out(rows, v_rows, 0, flat.narrow(0, first, size).reshape(-1));
    const auto step_grad = grad.narrow(0, first, size);
    auto conv_rows = rows;  // the conv saw the scaled rows; the rows stay for the scale's gradient
    if (scale.has_value()) {
      conv_rows = scaled_of[slot].narrow(0, 0, size * k);
      auto scaled = conv_rows.view({size, k, c});
      at::mul_out(scaled, rows.view({size, k, c}), scale->narrow(0, first, size).unsqueeze(-1));
    }
    auto grad_rows = grad_rows_of[slot].narrow(0, 0, size);
    auto partial = weight_grad ? weight_of[slot] : at::Tensor();
    rows_conv_backward(conv_rows.view({size, k * c}), weight, step_grad, grad_rows, partial, weight_grad, onednn);
    if (scale_grad) {
      auto product = conv_rows.view({size, k, c});
      at::mul_out(product, grad_rows.view({size, k, c}), rows.view({size, k, c}));
      auto out = grad_s.narrow(0, first, size);
      at::sum_out(out, product, {-1});
    }
    if (rows_grad && scale.has_value()) {
      grad_rows.view({size, k, c}).mul_(scale->narrow(0, first, size).unsqueeze(-1));
    }
  };
  auto merge = [&](int64_t i, int64_t slot) {
    if (rows_grad) add_step_rows(grad_v, flat, grad_rows_of[slot], i, step);
    if (weight_grad) grad_w.add_(weight_of[slot]);
  };
  in_step_order(steps, compute, merge);
  return {grad_v, grad_w, grad_s};
}

// convnn::gather_scaled_sum (convnn/knn/ops.py): out[t] = sum_j w[t, j] scale[j] v_rows[flat[t, j]] in
// steps of `step` tokens. v_rows [L, d], flat [T, k], w [T, k], scale [k, d] -> [T, d].
at::Tensor gather_scaled_sum(const at::Tensor& v_rows, const at::Tensor& flat, const at::Tensor& w,
                             const at::Tensor& scale, int64_t step) {
  const int64_t tokens = flat.size(0), k = flat.size(1), d = v_rows.size(1);
  auto out = at::empty({tokens, d}, v_rows.options());
  const int64_t steps = (tokens + step - 1) / step;
  auto buffers = slots_of(v_rows, std::min(thread_count(), steps), std::min(step, tokens) * k, d);
  for_each_item(steps, [&](int64_t i, int64_t slot) {
    const auto [first, stop] = part(i, step, tokens);
    const int64_t size = stop - first;
    auto rows = buffers[slot].narrow(0, 0, size * k);
    at::index_select_out(rows, v_rows, 0, flat.narrow(0, first, size).reshape(-1));
    auto result = out.narrow(0, first, size).unsqueeze(1);
    at::bmm_out(result, w.narrow(0, first, size).unsqueeze(1), rows.view({size, k, d}).mul_(scale));
  });
  return out;
}

// Gradients of gather_scaled_sum for grad [T, d]: (v_rows' [L, d], w' [T, k], scale' [k, d]), each
// empty where not asked for.
std::tuple<at::Tensor, at::Tensor, at::Tensor> gather_scaled_sum_backward(
    const at::Tensor& grad, const at::Tensor& v_rows, const at::Tensor& flat, const at::Tensor& w,
    const at::Tensor& scale, bool rows_grad, bool w_grad, bool scale_grad, int64_t step) {
  const int64_t tokens = flat.size(0), k = flat.size(1), d = v_rows.size(1);
  auto grad_v = rows_grad ? at::zeros(v_rows.sizes(), v_rows.options()) : v_rows.new_empty({0});
  auto grad_w = w_grad ? at::zeros_like(w) : w.new_empty({0});
  auto grad_scale = scale_grad ? at::zeros_like(scale) : scale.new_empty({0});
  const int64_t steps = (tokens + step - 1) / step, slots = std::min(thread_count(), steps);
  const int64_t width = std::min(step, tokens) * k;
  auto rows_of = slots_of(v_rows, slots, width, d);
  auto scaled_of = rows_grad ? slots_of(v_rows, slots, width, d) : at::Tensor();
  auto scale_of = scale_grad ? slots_of(scale, slots, k, d) : at::Tensor();
  auto compute = [&](int64_t i, int64_t slot) {
    const auto [first, stop] = part(i, step, tokens);
    const int64_t size = stop - first;
    auto gathered = rows_of[slot].narrow(0, 0, size * k);
    at::index_select_out(gathered, v_rows, 0, flat.narrow(0, first, size).reshape(-1));
    auto rows = gathered.view({size, k, d});
    const auto step_grad = grad.narrow(0, first, size), step_w = w.narrow(0, first, size);
    auto product = rows.mul_(step_grad.unsqueeze(1));  // g[t] * rows[t, j], in the gather buffer
    if (scale_grad) {  // sum_t w[t, j] g[t] * rows[t, j]: k products [1, S] @ [S, d]
      auto partial = scale_of[slot].unsqueeze(1);
      at::bmm_out(partial, step_w.t().unsqueeze(1), product.transpose(0, 1));
    }
    if (w_grad) grad_w.narrow(0, first, size).copy_((product * scale).sum(2));
    if (rows_grad) {  // w[t, j] * scale[j] * g[t] into row flat[t, j]
      auto scaled = scaled_of[slot].narrow(0, 0, size * k).view({size, k, d});
      at::mul_out(scaled, step_w.unsqueeze(2), scale);
      scaled.mul_(step_grad.unsqueeze(1));
    }
  };
  auto merge = [&](int64_t i, int64_t slot) {
    if (rows_grad) add_step_rows(grad_v, flat, scaled_of[slot], i, step);
    if (scale_grad) grad_scale.add_(scale_of[slot]);
  };
  in_step_order(steps, compute, merge);
  return {grad_v, grad_w, grad_scale};
}

// convnn::selected_pairs_grad (convnn/knn/ops.py): for the pairs (i, flat[b, i, j]) of q [B, N, h]
// and the key rows k_rows [B M, h] with gradient grad [B, N, p]: q' [B, N, h] = sum_j g_ij k_j and
// k' [B M, h] with the rows g_ij q_i added in order, in steps of `step` queries (all images).
std::tuple<at::Tensor, at::Tensor> selected_pairs_grad(const at::Tensor& q, const at::Tensor& k_rows,
                                                       const at::Tensor& flat, const at::Tensor& grad,
                                                       int64_t step) {
  const int64_t batch = flat.size(0), n = flat.size(1), p = flat.size(2), h = q.size(2);
  auto grad_q = at::empty_like(q);
  auto grad_k = at::zeros(k_rows.sizes(), k_rows.options());
  const int64_t steps = (n + step - 1) / step, slots = std::min(thread_count(), steps);
  auto rows_of = slots_of(q, slots, batch * std::min(step, n) * p, h);
  std::vector<at::Tensor> index_of(slots);
  auto compute = [&](int64_t i, int64_t slot) {
    const auto [first, stop] = part(i, step, n);
    const int64_t size = stop - first;
    index_of[slot] = flat.narrow(1, first, size).reshape(-1);
    auto rows = rows_of[slot].narrow(0, 0, batch * size * p);
    at::index_select_out(rows, k_rows, 0, index_of[slot]);
    const auto g = grad.narrow(1, first, size).unsqueeze(-1);  // [B, c, p, 1]
    auto pairs = rows.view({batch, size, p, h});
    grad_q.narrow(1, first, size).copy_(pairs.mul_(g).sum(2));
    at::mul_out(pairs, q.narrow(1, first, size).unsqueeze(2), g);  // g_ij q_i, in the same buffer
  };
  auto merge = [&](int64_t, int64_t slot) {
    add_rows(grad_k, index_of[slot], rows_of[slot].narrow(0, 0, index_of[slot].numel()));
  };
  in_step_order(steps, compute, merge);
  return {grad_q, grad_k};
}

// ---- layout copies ----------------------------------------------------------------------------

// dst[j ds + i] = src[i ss + j] for i < rows, j < cols: 8 x 8 blocks (float32: transposed in AVX2
// registers), the edges one by one.
template <typename T>
void transpose(const T* src, int64_t ss, T* dst, int64_t ds, int64_t rows, int64_t cols) {
  const int64_t full_rows = rows - rows % 8, full_cols = cols - cols % 8;
  for (int64_t i = 0; i < full_rows; i += 8) {
    for (int64_t j = 0; j < full_cols; j += 8) {
      const T* from = src + i * ss + j;
      T* to = dst + j * ds + i;
#if defined(__AVX2__)
      if constexpr (std::is_same_v<T, float>) {
        __m256 r[8], t[8];
        for (int q = 0; q < 8; ++q) r[q] = _mm256_loadu_ps(from + q * ss);
        for (int q = 0; q < 8; q += 2) {
          t[q] = _mm256_unpacklo_ps(r[q], r[q + 1]);
          t[q + 1] = _mm256_unpackhi_ps(r[q], r[q + 1]);
        }
        for (int q = 0; q < 8; q += 4) {
          r[q] = _mm256_shuffle_ps(t[q], t[q + 2], 0x44);
          r[q + 1] = _mm256_shuffle_ps(t[q], t[q + 2], 0xEE);
          r[q + 2] = _mm256_shuffle_ps(t[q + 1], t[q + 3], 0x44);
          r[q + 3] = _mm256_shuffle_ps(t[q + 1], t[q + 3], 0xEE);
        }
        for (int q = 0; q < 4; ++q) {
          _mm256_storeu_ps(to + q * ds, _mm256_permute2f128_ps(r[q], r[q + 4], 0x20));
          _mm256_storeu_ps(to + (q + 4) * ds, _mm256_permute2f128_ps(r[q], r[q + 4], 0x31));
        }
        continue;
      }
#endif
      for (int64_t a = 0; a < 8; ++a) {
        for (int64_t b = 0; b < 8; ++b) to[b * ds + a] = from[a * ss + b];
      }
    }
  }
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = i < full_rows ? full_cols : 0; j < cols; ++j) dst[j * ds + i] = src[i * ss + j];
  }
}

// Items [0, items) on torch's threads, about 16k values (`per_item` each) per task.
template <typename F>
void copy_items(int64_t items, int64_t per_item, const F& copy) {
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 14) / std::max<int64_t>(1, per_item));
  at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) copy(item);
  });
}

// convnn::padded_rows (convnn/layers/convnn.py): x [B, C, H, W] -> the token rows of the map padded by
// `pad` zeros, [B, H + 2 pad, W + 2 pad, C]; one padded row of tokens per item.
at::Tensor padded_rows(const at::Tensor& x_in, int64_t pad) {
  TORCH_CHECK(x_in.dim() == 4 && pad >= 0, "padded_rows needs x [B, C, H, W] and pad >= 0, got ",
              x_in.sizes(), " and ", pad);
  const auto x = x_in.contiguous();
  const int64_t batch = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  const int64_t hp = h + 2 * pad, wp = w + 2 * pad;
  auto out = at::empty({batch, hp, wp, c}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "padded_rows", [&] {
    const scalar_t* from = x.const_data_ptr<scalar_t>();
    scalar_t* to = out.mutable_data_ptr<scalar_t>();
    copy_items(batch * hp, wp * c, [&](int64_t item) {
      const int64_t b = item / hp, row = item % hp - pad;
      scalar_t* tokens = to + item * wp * c;
      if (row < 0 || row >= h) return std::fill(tokens, tokens + wp * c, scalar_t(0));
      std::fill(tokens, tokens + pad * c, scalar_t(0));
      std::fill(tokens + (pad + w) * c, tokens + wp * c, scalar_t(0));
      transpose(from + (b * c * h + row) * w, h * w, tokens + pad * c, c, c, w);
    });
  });
  return out;
}

// The gradient of padded_rows: rows [B, H + 2 pad, W + 2 pad, C] -> the map [B, C, H, W] of the
// unpadded tokens; one row of tokens per item.
at::Tensor cropped_map(const at::Tensor& rows_in, int64_t pad) {
  TORCH_CHECK(rows_in.dim() == 4 && pad >= 0 && rows_in.size(1) > 2 * pad && rows_in.size(2) > 2 * pad,
              "cropped_map needs rows [B, H + 2 pad, W + 2 pad, C], got ", rows_in.sizes(), " and pad ", pad);
  const auto rows = rows_in.contiguous();
  const int64_t batch = rows.size(0), hp = rows.size(1), wp = rows.size(2), c = rows.size(3);
  const int64_t h = hp - 2 * pad, w = wp - 2 * pad;
  auto out = at::empty({batch, c, h, w}, rows.options());
  AT_DISPATCH_FLOATING_TYPES(rows.scalar_type(), "cropped_map", [&] {
    const scalar_t* from = rows.const_data_ptr<scalar_t>();
    scalar_t* to = out.mutable_data_ptr<scalar_t>();
    copy_items(batch * h, w * c, [&](int64_t item) {
      const int64_t b = item / h, row = item % h;
      transpose(from + ((b * hp + row + pad) * wp + pad) * c, c, to + (b * c * h + row) * w, h * w, w, c);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(convnn_native, m) {
  m.def("topk_rows(Tensor scores, int k) -> (Tensor, Tensor)");
  m.def("index_add_rows(Tensor(a!) out, Tensor index, Tensor src) -> ()");
  m.def(
      "select_chunks(Tensor q, Tensor keys, int m, Tensor ids, int picks, bool dot, Tensor? candidates,"
      " bool self_first, int[] starts, bool onednn) -> (Tensor, Tensor, Tensor)");
  m.def(
      "gather_aggregate(Tensor v_rows, Tensor flat, Tensor weight, Tensor? bias, Tensor? scale, int step)"
      " -> Tensor");
  m.def(
      "gather_aggregate_backward(Tensor grad, Tensor v_rows, Tensor flat, Tensor weight, Tensor? scale,"
      " bool rows_grad, bool weight_grad, bool scale_grad, int step, bool onednn) -> (Tensor, Tensor, Tensor)");
  m.def("gather_scaled_sum(Tensor v_rows, Tensor flat, Tensor w, Tensor scale, int step) -> Tensor");
  m.def(
      "gather_scaled_sum_backward(Tensor grad, Tensor v_rows, Tensor flat, Tensor w, Tensor scale,"
      " bool rows_grad, bool w_grad, bool scale_grad, int step) -> (Tensor, Tensor, Tensor)");
  m.def("selected_pairs_grad(Tensor q, Tensor k_rows, Tensor flat, Tensor grad, int step) -> (Tensor, Tensor)");
  m.def("padded_rows(Tensor x, int pad) -> Tensor");
  m.def("cropped_map(Tensor rows, int pad) -> Tensor");
}

TORCH_LIBRARY_IMPL(convnn_native, CPU, m) {
  m.impl("topk_rows", &topk_rows);
  m.impl("index_add_rows", &index_add_rows);
  m.impl("select_chunks", &select_chunks);
  m.impl("gather_aggregate", &gather_aggregate);
  m.impl("gather_aggregate_backward", &gather_aggregate_backward);
  m.impl("gather_scaled_sum", &gather_scaled_sum);
  m.impl("gather_scaled_sum_backward", &gather_scaled_sum_backward);
  m.impl("selected_pairs_grad", &selected_pairs_grad);
  m.impl("padded_rows", &padded_rows);
  m.impl("cropped_map", &cropped_map);
}
