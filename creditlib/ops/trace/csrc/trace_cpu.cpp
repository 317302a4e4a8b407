// Fused CPU kernel of the eligibility trace z = W x (and W^T y), one pass, O(T), carries in registers.
//
// Positions t, j count the valid tokens of a row (or varlen segment) from 0. With d = gamma*lam,
// the window start a_t and the end b_t of the early region (see docs/trace.md):
//
//   z_t = sum_{j=a_t..t} d^(t-j) x_j  +  sum_{j=0..b_t} d^j x_j  +  eps * sum_{j=b_t+1..a_t-1} x_j
//
// recent: a_t = 0 (no floor) or max(0, t-L) (floor), b_t = -1;
// both:   a_t = t/2+1 (no floor) or max(t/2+1, t-L), b_t = t/2 or min(t/2, L).
// a_t and b_t grow by at most one per step, so one forward pass keeps three carries: R (window),
// S (early) and E (middle), and reads x at two lagged valid positions a and b.
// The transpose g_j = sum_{t>=j} w(t, j) y_t is the same pass in reverse with
// A_j = max{t : a_t <= j} (window [j, A_j]) and B_j = min{t : b_t >= j} (early region t >= B_j,
// weight d^j times a plain suffix sum).
//
// Powers d^k come from a float64 table (cast to the accumulation type); d itself is applied to
// float32 carries as d_hi + d_lo (two float32 numbers), so that d is never rounded to float32.
// Masked inputs are never read into a carry (select, never multiply), so NaN/inf there cannot leak.
//
// Paths: (1) AVX-512, float32, "recent" without floor (normalised or not), padded [R, T] with any mask: 16 rows per
// vector (16x16 tile transposes; the mask is transposed 64 columns at a time as 4-byte words), one
// FMA per step on the carry chain (see recent_blocks).
// (2) AVX-512, float32, any other style: 16 rows (or varlen segments) per vector on a schedule that
// is uniform over valid positions. Rows whose valid tokens form one contiguous run (no mask, left or
// right padding, varlen) are read in place; other masked rows are compacted into a scratch buffer
// (vcompressps), scanned there and expanded back (vexpandps).
// (3) scalar, any dtype/style/mask: float64, and float32 where AVX-512 is not available.
// Half types are converted to float32, scanned, and rounded back (float32 accumulation).
//
// Normalised weights (normalize): row t is divided by N_t = sum_{i<=t} w(t, i), a float64 table of
// the valid position (row_sums) cast to the accumulation type: the forward multiplies each output by
// 1/N_t as it is stored, the transpose multiplies each input by 1/N_j as it is read (in path (2) the
// 16 lanes share the valid position, so one broadcast per step). Normalised "recent" without a floor
// stays on path (1), reading 1/N by column, which is the valid position in rows without a mask or with
// right padding; a block holding any other row notices it on the fly and is redone with a per-lane
// count of valid tokens and a gather of 1/N.
// Sequence style (kind 2): each valid token gets the mean of its row's valid inputs (sum accumulated
// in float64); the operator is its own transpose.
// Masks: any nonzero byte is a valid token (a uint8 tensor viewed as bool may hold 2 or 255).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <cstdlib>
#include <limits>
#include <memory>
#include <mutex>
#include <tuple>
#include <vector>

// AVX-512 F (compress/expand), BW (byte masks) and VL (128-bit masked byte loads): Skylake-SP onwards.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && !defined(CREDITLIB_NO_AVX512)
#include <immintrin.h>
#define CREDITLIB_AVX512 1
#else
#define CREDITLIB_AVX512 0
#endif

namespace {

constexpr int64_t kInf = std::numeric_limits<int64_t>::max() / 4;

// Set when a carry ends non-finite: some valid input was NaN/inf (or the sum overflowed). Every
// valid input enters the carry R at its own step, and a non-finite carry stays non-finite (d > 0:
// d * inf = inf; d = 0: 0 * inf = NaN), so checking the last carry of each row costs nothing per
// token. The caller (cpu.py) then redoes the affected rows on the careful path.
struct Bad {
  std::atomic<bool> hit{false};
  inline void mark() { hit.store(true, std::memory_order_relaxed); }
  template <typename acc_t>
  inline void check(acc_t v) {
    if (!std::isfinite(v)) mark();
  }
};

// ------------------------------------------------------------------------------------ schedule
struct Sched {
  bool both;
  bool floor;  // the eps floor binds somewhere (L finite and below the longest lag)
  int64_t L;   // window: largest k with d^k >= eps
  bool normalize = false;  // divide row t by N_t (see inv_row_sums)
  int64_t Lraw = -1;       // the window as given (-1: none), for the row sums
  inline int64_t a_of(int64_t t) const {
    if (both) {
      const int64_t a = t / 2 + 1;
      return floor ? std::max(a, t - L) : a;
    }
    return floor ? std::max<int64_t>(0, t - L) : 0;
  }
  inline int64_t b_of(int64_t t) const {
    if (!both) return -1;
    return floor ? std::min(t / 2, L) : t / 2;
  }
  // max{t : a_t <= j}
  inline int64_t A_of(int64_t j) const {
    if (both) {
      const int64_t A = 2 * j - 1;
      return floor ? std::min(A, j + L) : A;
    }
    return floor ? j + L : kInf;
  }
  // min{t : b_t >= j}
  inline int64_t B_of(int64_t j) const {
    if (!both) return kInf;
    if (floor && j > L) return kInf;
    return 2 * j;
  }
};

// d applied to a carry: float32 carries use d = hi + lo so that d is not rounded to float32.
template <typename acc_t>
struct DMul;
template <>
struct DMul<float> {
  float hi, lo;
  explicit DMul(double d) : hi(static_cast<float>(d)), lo(static_cast<float>(d - static_cast<double>(static_cast<float>(d)))) {}
  inline float step(float R, float u) const { return std::fma(hi, R, std::fma(lo, R, u)); }
};
template <>
struct DMul<double> {
  double d;
  explicit DMul(double d_) : d(d_) {}
  inline double step(double R, double u) const { return std::fma(d, R, u); }
};

// 1/N_k for k = 0..n-1 (then `pad` zeros), N_k = sum_{i<=k} w(k, i); f(m) = d^m (m <= L, or no floor)
// else eps, F(h) = sum_{m<h} f(m); recent N_k = F(k+1), both N_k = 2 F(ceil(k/2)) + [k even] f(k/2).
// Running sums in float64: no d^-k, nothing overflows.
template <typename acc_t>
std::vector<acc_t> inv_row_sums(double d, double eps, int64_t L, bool both, int64_t n, int64_t pad) {
  std::vector<double> f(static_cast<size_t>(n + 1)), F(static_cast<size_t>(n + 2));
  double p = 1.0;
  F[0] = 0.0;
  for (int64_t m = 0; m <= n; ++m) {
    f[m] = (L >= 0 && m > L) ? eps : p;
    F[m + 1] = F[m] + f[m];
    p *= d;
  }
  std::vector<acc_t> inv(static_cast<size_t>(n + pad), acc_t(0));
  for (int64_t k = 0; k < n; ++k) {
    const double N = both ? 2.0 * F[(k + 1) / 2] + ((k % 2 == 0) ? f[k / 2] : 0.0) : F[k + 1];
    inv[k] = static_cast<acc_t>(1.0 / N);
  }
  return inv;
}

// inv_row_sums, cached: the last few tables are kept (O(T) scalar work per call would cost ~10% of
// a B = 64 trace). Shared read-only between threads; the cache itself is guarded by a mutex.
template <typename acc_t>
std::shared_ptr<const std::vector<acc_t>> cached_inv_row_sums(double d, double eps, int64_t L, bool both, int64_t n,
                                                              int64_t pad) {
  using Key = std::tuple<double, double, int64_t, bool, int64_t, int64_t>;
  static std::mutex mu;
  static std::vector<std::pair<Key, std::shared_ptr<const std::vector<acc_t>>>> cache;
  static size_t next = 0;
  constexpr size_t kSlots = 8;
  const Key key{d, eps, L, both, n, pad};
  {
    std::lock_guard<std::mutex> g(mu);
    for (const auto& e : cache)
      if (e.first == key) return e.second;
  }
  auto tab = std::make_shared<const std::vector<acc_t>>(inv_row_sums<acc_t>(d, eps, L, both, n, pad));
  std::lock_guard<std::mutex> g(mu);
  if (cache.size() < kSlots) {
    cache.emplace_back(key, tab);
  } else {
    cache[next] = {key, tab};
    next = (next + 1) % kSlots;
  }
  return tab;
}

template <typename acc_t>
std::vector<acc_t> power_table(double d, int64_t n) {
  // d^k for k = 0..n, running product in float64 (relative error <= k * 2^-53).
  std::vector<double> p(static_cast<size_t>(n + 1));
  double v = 1.0;
  for (int64_t k = 0; k <= n; ++k) {
    p[k] = v;
    v *= d;
  }
  return std::vector<acc_t>(p.begin(), p.end());
}

// ------------------------------------------------------------------------------------ scalar path
// One row (or segment) of length T; m == nullptr means all valid.
template <typename acc_t>
void row_forward(const acc_t* x, const uint8_t* m, int64_t T, acc_t* out, const acc_t* pw,
                 const DMul<acc_t>& dm, acc_t eps, const Sched& s, const acc_t* inv, Bad& bad) {
  acc_t R = 0, S = 0, E = 0;
  int64_t t = 0, a = 0, b = -1;
  int64_t pa = 0;
  if (m)
    while (pa < T && !m[pa]) ++pa;
  int64_t pb = pa;  // array positions of valid index a and b + 1
  auto next_valid = [&](int64_t p) {
    ++p;
    if (m)
      while (p < T && !m[p]) ++p;
    return p;
  };
  for (int64_t i = 0; i < T; ++i) {
    if (m && !m[i]) {
      out[i] = acc_t(0);
      continue;
    }
    acc_t u = x[i];
    const int64_t na = s.a_of(t);
    while (a < na) {  // x_a leaves the window for the middle
      const acc_t xa = x[pa];
      u -= pw[t - a] * xa;
      E += xa;
      ++a;
      pa = next_valid(pa);
    }
    R = dm.step(R, u);
    const int64_t nb = s.b_of(t);
    while (b < nb) {  // x_b leaves the middle for the early region
      ++b;
      const acc_t xb = x[pb];
      S += pw[b] * xb;
      E -= xb;
      pb = next_valid(pb);
    }
    acc_t z = R + S;
    if (eps != acc_t(0)) z += eps * E;
    out[i] = inv ? z * inv[t] : z;
    ++t;
  }
  bad.check(R);
}

template <typename acc_t>
void row_transpose(const acc_t* y, const uint8_t* m, int64_t T, acc_t* out, const acc_t* pw,
                   const DMul<acc_t>& dm, acc_t eps, const Sched& s, const acc_t* inv, Bad& bad) {
  int64_t n = T, plast = T - 1;
  if (m) {
    n = 0;
    plast = -1;
    for (int64_t i = 0; i < T; ++i)
      if (m[i]) {
        ++n;
        plast = i;
      }
  }
  acc_t R = 0, U = 0, E = 0;
  int64_t j = n - 1, Acur = n - 1, Bcur = n;
  int64_t pA = plast, pB = T;  // array positions of valid index Acur and Bcur
  auto prev_valid = [&](int64_t p) {
    --p;
    if (m)
      while (p >= 0 && !m[p]) --p;
    return p;
  };
  for (int64_t i = T - 1; i >= 0; --i) {
    if (m && !m[i]) {
      out[i] = acc_t(0);
      continue;
    }
    acc_t u = inv ? y[i] * inv[j] : y[i];  // normalised: the transpose reads y_t / N_t
    const int64_t nA = std::min(s.A_of(j), n - 1);
    while (Acur > nA) {  // y_A leaves the window for the middle
      const acc_t ya = inv ? y[pA] * inv[Acur] : y[pA];
      u -= pw[Acur - j] * ya;
      E += ya;
      --Acur;
      pA = prev_valid(pA);
    }
    R = dm.step(R, u);
    const int64_t nB = std::min(s.B_of(j), n);
    while (Bcur > nB) {  // y_B leaves the middle for the early region
      --Bcur;
      pB = prev_valid(pB);
      const acc_t yb = inv ? y[pB] * inv[Bcur] : y[pB];
      U += yb;
      E -= yb;
    }
    acc_t g = R;
    if (s.both) g += pw[j] * U;
    if (eps != acc_t(0)) g += eps * E;
    out[i] = g;
    --j;
  }
  bad.check(R);
}

#if CREDITLIB_AVX512
// ------------------------------------------------------------------------------------ AVX-512 helpers
__attribute__((always_inline)) static inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    r[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xdd);
    t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xdd);
  }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd);
  }
}

// Any lane inf/NaN (v - v is NaN exactly there).
static inline bool any_nonfinite(__m512 v) {
  return _mm512_cmp_ps_mask(_mm512_sub_ps(v, v), _mm512_setzero_ps(), _CMP_NEQ_UQ) != 0;
}

static inline __mmask16 count_mask(int64_t c) {
  return c >= 16 ? static_cast<__mmask16>(0xffff) : c <= 0 ? 0 : static_cast<__mmask16>((1u << c) - 1u);
}



// Per-thread scratch kept between calls (up to 64 MiB), so that repeated calls do not pay page
// faults on fresh memory; larger requests are allocated and freed per call.
class ScratchBuf {
 public:
  explicit ScratchBuf(int64_t n) {
    constexpr int64_t kKeep = int64_t(16) << 20;  // floats
    if (n <= kKeep) {
      thread_local std::unique_ptr<float[]> keep;
      thread_local int64_t cap = 0;
      if (n > cap) {
        keep.reset(new float[n]);
        cap = n;
      }
      p_ = keep.get();
    } else {
      own_.reset(new float[n]);
      p_ = own_.get();
    }
  }
  float* get() const { return p_; }

 private:
  std::unique_ptr<float[]> own_;
  float* p_ = nullptr;
};

// ------------------------------------------------------------------------------------ masks
struct RowInfo {
  int64_t first = -1, last = -1, count = 0;
};

static RowInfo analyse_row(const uint8_t* m, int64_t T) {
  RowInfo ri;
  for (int64_t c = 0; c < T; c += 64) {
    const int64_t w = std::min<int64_t>(64, T - c);
    const __mmask64 k = w >= 64 ? ~__mmask64(0) : ((__mmask64(1) << w) - 1);
    const __m512i v = _mm512_maskz_loadu_epi8(k, m + c);
    const uint64_t b = _mm512_test_epi8_mask(v, v);
    if (b) {
      if (ri.first < 0) ri.first = c + __builtin_ctzll(b);
      ri.last = c + 63 - __builtin_clzll(b);
      ri.count += __builtin_popcountll(b);
    }
  }
  return ri;
}

// Valid values of a row to the front of dst (dst needs 16 floats of slack past the count).
static void compact_row(const float* x, const uint8_t* m, int64_t T, float* dst) {
  for (int64_t c = 0; c < T; c += 16) {
    const __mmask16 wm = count_mask(T - c);
    const __m128i mb = _mm_maskz_loadu_epi8(wm, m + c);
    const __mmask16 k = _mm_test_epi8_mask(mb, mb);
    const __m512 v = _mm512_maskz_loadu_ps(k, x + c);  // masked lanes never read (NaN-safe)
    _mm512_storeu_ps(dst, _mm512_maskz_compress_ps(k, v));
    dst += __builtin_popcount(static_cast<unsigned>(k));
  }
}

// Inverse of compact_row: values back to the valid positions, 0 elsewhere.
static void expand_row(const float* src, const uint8_t* m, int64_t T, float* out) {
  for (int64_t c = 0; c < T; c += 16) {
    const __mmask16 wm = count_mask(T - c);
    const __m128i mb = _mm_maskz_loadu_epi8(wm, m + c);
    const __mmask16 k = _mm_test_epi8_mask(mb, mb);
    const __m512 v = _mm512_loadu_ps(src);
    _mm512_mask_storeu_ps(out + c, wm, _mm512_maskz_expand_ps(k, v));
    src += __builtin_popcount(static_cast<unsigned>(k));
  }
}

// ------------------------------------------------------------------------------------ path (1)
// "recent", no floor, padded float32 [R, T], any mask. NB blocks of 16 rows (NB = 1 is used: more
// blocks meant more concurrent memory streams and ran slower, on Intel and on AMD Zen 4 alike).
// Each 16-column tile of a block is one of three kinds, read from the mask of its 64-column group:
// full (every live row valid in all 16 columns: the unmasked step), empty (no row valid: zeros are
// stored, x is not read and the carries stay) or mixed (the masked step). Right-padded rows give
// mixed tiles only between the shortest and the longest row of the block.
// NORM (normalised "recent"): 1/N_k is read by *column* from `inv` (padded to T + 16), which is the
// valid position only in rows whose valid tokens start at column 0 and are contiguous (no mask, right
// padding). Any other row is detected on the fly (a valid token after a masked one; in reverse, a
// masked one after a valid one): the block stops and returns false, and the caller redoes it with
// GATHER, which counts each lane's valid tokens (in reverse: from its row's total) and gathers 1/N_k
// per lane (one masked gather per step; GATHER tiles always take the masked step). Returns true
// when the block is done.
template <int NB, bool MASKED, bool REV, bool NORM = false, bool GATHER = false>
bool recent_blocks(const float* x, const uint8_t* m, float* out, int64_t R, int64_t T, int64_t row0, Bad& bad,
                   const DMul<float>& dm, const float* inv = nullptr) {
  static_assert(!GATHER || (NORM && MASKED), "GATHER is the normalised, masked variant");
  // R_t = c_t R_{t-1} + u_t with c_t = d (valid) or 1 (masked, u_t = 0) and d = hi + lo. The small
  // part lo R_{t-1} is taken as lo W_t, W_t = R_{t-1} without its own small part (hi R_{t-2} + u_{t-1}
  // after a valid step, R_{t-2} = R_{t-1} after a masked one; dropped: lo lo R_{t-2}, ~1e-16
  // relative), so only one FMA per step is on the carry chain:
  //   R_t = hi R_{t-1} + (lo W_t + u_t),   W_{t+1} = hi R_{t-1} + u_t   (valid)
  //   R_t = R_{t-1},                       W_{t+1} = R_{t-1}            (masked)
  // The masked step is two masked FMAs that pass R_{t-1} through in masked lanes: the masked
  // lanes' input is never used (NaN/inf there cannot leak into a carry or an output).
  const __m512 vhi = _mm512_set1_ps(dm.hi), vlo = _mm512_set1_ps(dm.lo);
  __m512 R1[NB], W[NB];
  __m512i cnt[NB], nrow[NB];  // GATHER: valid tokens seen per lane; (REV) valid tokens per row
  const __m512i ione = _mm512_set1_epi32(1);
  const float* xr[NB][16];
  float* orow[NB][16];
  const uint8_t* mr[NB][16];
  __mmask16 live[NB];
  for (int b = 0; b < NB; ++b) {
    R1[b] = W[b] = _mm512_setzero_ps();
    alignas(64) int32_t nv[16];
    live[b] = 0;
    for (int l = 0; l < 16; ++l) {
      const int64_t r = row0 + 16 * b + l;
      const bool lv = r < R;
      if (lv) live[b] = static_cast<__mmask16>(live[b] | (1u << l));
      xr[b][l] = lv ? x + r * T : nullptr;
      orow[b][l] = lv ? out + r * T : nullptr;
      mr[b][l] = (lv && MASKED) ? m + r * T : nullptr;
      nv[l] = (GATHER && REV && lv) ? static_cast<int32_t>(analyse_row(m + r * T, T).count) : 0;
    }
    cnt[b] = _mm512_setzero_si512();
    nrow[b] = _mm512_load_si512(nv);
  }
  const int64_t ntiles = (T + 15) / 16;
  __mmask16 seen = 0, viol = 0;  // NORM && MASKED: lanes that saw a masked (REV: valid) token; misfits
  alignas(64) float mbuf[NB][16][16];  // transposed mask bytes of the current 64 columns
  uint64_t colall[NB], colany[NB];     // columns of the current 64 where every live row / some row is valid
  int64_t mgroup = -1;
  __m512i bytesel[4];
  for (int q = 0; q < 4; ++q) bytesel[q] = _mm512_set1_epi32(0xff << (8 * q));
  for (int64_t it = 0; it < ntiles; ++it) {
    const int64_t tile = REV ? ntiles - 1 - it : it;
    const int64_t c0 = tile * 16;
    const int64_t w = std::min<int64_t>(16, T - c0);
    const __mmask16 wm = count_mask(w);
    const bool newgroup = MASKED && (REV ? (c0 >> 6) != mgroup : (c0 & 63) == 0);
    for (int b = 0; b < NB; ++b) {
      if (newgroup) {
        // mask bytes of 64 columns: one cache line per row, transposed as 4-byte words, so that
        // word k of lane l holds columns 4k..4k+3 of row l
        const int64_t g0 = c0 & ~int64_t(63);
        const int64_t gw = std::min<int64_t>(64, T - g0);
        const __mmask64 gm = gw >= 64 ? ~__mmask64(0) : ((__mmask64(1) << gw) - 1);
        __m512 v[16];
        uint64_t all = ~uint64_t(0), any = 0;
        for (int l = 0; l < 16; ++l) {
          if (mr[b][l]) {
            const __m512i mv = _mm512_maskz_loadu_epi8(gm, mr[b][l] + g0);
            const uint64_t bits = _mm512_test_epi8_mask(mv, mv);
            all &= bits;
            any |= bits;
            v[l] = _mm512_castsi512_ps(mv);
          } else {
            v[l] = _mm512_setzero_ps();
          }
        }
        colall[b] = live[b] ? all : 0;
        colany[b] = any;
        transpose16(v);
        for (int k = 0; k < 16; ++k) _mm512_store_ps(mbuf[b][k], v[k]);
        if (b == NB - 1) mgroup = c0 >> 6;
      }
      // tile kind: columns (c0 & 63) .. +15 of the group (a tile of fewer than 16 columns is mixed)
      bool full = !MASKED, empty = false;
      if (MASKED && !GATHER) {
        const unsigned sh = static_cast<unsigned>(c0 & 63);
        full = ((colall[b] >> sh) & 0xffffu) == 0xffffu;
        empty = ((colany[b] >> sh) & 0xffffu) == 0;
      }
      if (empty) {  // no valid token: outputs 0, the carry passes, W = R (as after a masked step)
        W[b] = R1[b];
        if (NORM) {
          if (REV) viol |= seen;
          else seen = static_cast<__mmask16>(0xffff);
        }
        const __m512 z = _mm512_setzero_ps();
        for (int l = 0; l < 16; ++l)
          if (orow[b][l]) _mm512_mask_storeu_ps(orow[b][l] + c0, wm, z);
        continue;
      }
      __m512 v[16];  // the tile, transposed in registers: v[c] = column c0 + c of the 16 rows
      for (int l = 0; l < 16; ++l)
        v[l] = xr[b][l] ? _mm512_maskz_loadu_ps(wm, xr[b][l] + c0) : _mm512_setzero_ps();
      transpose16(v);
      if (full) {
        if (NORM && MASKED) {  // every live lane valid in all 16 columns
          if (REV) {
            viol |= static_cast<__mmask16>(~live[b] & seen);
            seen |= live[b];
          } else {
            viol |= static_cast<__mmask16>(live[b] & seen);
            seen |= static_cast<__mmask16>(~live[b]);
          }
        }
        __m512 r = R1[b], wv = W[b];
#pragma GCC unroll 16
        for (int cc = 0; cc < 16; ++cc) {
          const int c = REV ? 15 - cc : cc;
          __m512 xv = v[c];
          if (NORM && REV) xv = _mm512_mul_ps(xv, _mm512_set1_ps(inv[c0 + c]));  // y_t / N_t
          const __m512 t1 = _mm512_fmadd_ps(vlo, wv, xv);
          wv = _mm512_fmadd_ps(vhi, r, xv);
          r = _mm512_fmadd_ps(vhi, r, t1);
          v[c] = (NORM && !REV) ? _mm512_mul_ps(r, _mm512_set1_ps(inv[c0 + c])) : r;
        }
        R1[b] = r;
        W[b] = wv;
      } else {
        __m512 r = R1[b], wv = W[b];
#pragma GCC unroll 16
        for (int cc = 0; cc < 16; ++cc) {
          const int c = REV ? 15 - cc : cc;
          __m512 xv = v[c];
          if (NORM && REV && !GATHER) xv = _mm512_mul_ps(xv, _mm512_set1_ps(inv[c0 + c]));  // y_t / N_t
          const int64_t col = (c0 & 63) + c;
          const __mmask16 k = _mm512_test_epi32_mask(_mm512_load_si512(mbuf[b][col >> 2]), bytesel[col & 3]);
          if (GATHER) cnt[b] = _mm512_mask_add_epi32(cnt[b], k, cnt[b], ione);
          if (GATHER && REV) {  // y_t / N_k with k = (valid tokens of the row) - (valid tokens from t on)
            const __m512i idx = _mm512_sub_epi32(nrow[b], cnt[b]);
            xv = _mm512_mul_ps(xv, _mm512_mask_i32gather_ps(_mm512_setzero_ps(), k, idx, inv, 4));
          }
          if (NORM && !GATHER) {
            if (REV) {
              viol |= static_cast<__mmask16>(~k & seen);
              seen |= k;
            } else {
              viol |= static_cast<__mmask16>(k & seen);
              seen |= static_cast<__mmask16>(~k);
            }
          }
          const __m512 t1 = _mm512_fmadd_ps(vlo, wv, xv);
          wv = _mm512_mask_fmadd_ps(r, k, vhi, xv);  // masked lanes: R_{t-1}
          r = _mm512_mask_fmadd_ps(r, k, vhi, t1);   // masked lanes: R_{t-1}
          __m512 zo = r;
          if (NORM && !REV && !GATHER) zo = _mm512_mul_ps(r, _mm512_set1_ps(inv[c0 + c]));  // z_t / N_t
          if (GATHER && !REV)  // z_t / N_k with k = (valid tokens up to t) - 1
            zo = _mm512_mul_ps(r, _mm512_mask_i32gather_ps(_mm512_setzero_ps(), k, _mm512_sub_epi32(cnt[b], ione), inv, 4));
          v[c] = _mm512_maskz_mov_ps(k, zo);
        }
        R1[b] = r;
        W[b] = wv;
      }
      if (NORM && MASKED && !GATHER && viol) return false;  // a row that is not right-padded: redo with GATHER
      transpose16(v);
      for (int l = 0; l < 16; ++l)
        if (orow[b][l]) _mm512_mask_storeu_ps(orow[b][l] + c0, wm, v[l]);
    }
  }
  for (int b = 0; b < NB; ++b)
    if (any_nonfinite(R1[b])) bad.mark();
  return true;
}

// ------------------------------------------------------------------------------------ path (2)
// 16 lanes, lane l reads base[off[l] + i] for valid index i < len[l] (0 beyond), any style.
struct Lanes {
  const float* base;
  int64_t off[16];
  int64_t len[16];
  int64_t minlen;  // min over lanes of len: tiles below it need no per-lane masks
};

// Serves column i (the 16 lanes' values at valid index i) from a transposed 16x16 tile.
struct Reader {
  const Lanes* L = nullptr;
  const float* inv = nullptr;  // normalised transpose: column i is scaled by inv[i] (padded table)
  int64_t lo = std::numeric_limits<int64_t>::min() / 2;
  alignas(64) float buf[16][16];
  __attribute__((always_inline)) inline void fill(int64_t start) {
    __m512 v[16];
    if (start + 16 <= L->minlen) {
      for (int l = 0; l < 16; ++l) v[l] = _mm512_loadu_ps(L->base + L->off[l] + start);
    } else {
      for (int l = 0; l < 16; ++l) {
        const __mmask16 k = count_mask(L->len[l] - start);
        v[l] = k ? _mm512_maskz_loadu_ps(k, L->base + L->off[l] + start) : _mm512_setzero_ps();
      }
    }
    transpose16(v);
    if (inv) {
      for (int c = 0; c < 16; ++c) _mm512_store_ps(buf[c], _mm512_mul_ps(v[c], _mm512_set1_ps(inv[start + c])));
    } else {
      for (int c = 0; c < 16; ++c) _mm512_store_ps(buf[c], v[c]);
    }
    lo = start;
  }
  inline __m512 get(int64_t i) {
    if (static_cast<uint64_t>(i - lo) >= 16) fill(i & ~int64_t(15));
    return _mm512_load_ps(buf[i - lo]);
  }
};

struct Writer {
  const Lanes* L = nullptr;
  float* obase = nullptr;
  alignas(64) float buf[16][16];
  __attribute__((always_inline)) inline void flush(int64_t start) {
    __m512 v[16];
    for (int c = 0; c < 16; ++c) v[c] = _mm512_load_ps(buf[c]);
    transpose16(v);
    if (start + 16 <= L->minlen) {
      for (int l = 0; l < 16; ++l) _mm512_storeu_ps(obase + L->off[l] + start, v[l]);
    } else {
      for (int l = 0; l < 16; ++l) {
        const __mmask16 k = count_mask(L->len[l] - start);
        if (k) _mm512_mask_storeu_ps(obase + L->off[l] + start, k, v[l]);
      }
    }
  }
};

// Schedules with the style known at compile time (t, j >= 0).
template <bool BOTH, bool FLOOR>
inline int64_t a_sched(int64_t t, int64_t L) {
  if (BOTH) return FLOOR ? std::max((t >> 1) + 1, t - L) : (t >> 1) + 1;
  return FLOOR ? std::max<int64_t>(0, t - L) : 0;
}
template <bool BOTH, bool FLOOR>
inline int64_t b_sched(int64_t t, int64_t L) {
  return BOTH ? (FLOOR ? std::min(t >> 1, L) : (t >> 1)) : -1;
}
template <bool BOTH, bool FLOOR>
inline int64_t A_sched(int64_t j, int64_t L) {
  if (BOTH) return FLOOR ? std::min(2 * j - 1, j + L) : 2 * j - 1;
  return FLOOR ? j + L : kInf;
}
template <bool BOTH, bool FLOOR>
inline int64_t B_sched(int64_t j, int64_t L) {
  if (!BOTH) return kInf;
  return (FLOOR && j > L) ? kInf : 2 * j;
}

// G groups of 16 lanes in lockstep on one schedule (the schedule's scalar work is shared).
// Without a floor the middle region is empty (E = 0), and for "both" the token leaving the window
// is the one entering the early region, so one lagged reader serves both.
template <bool BOTH, bool FLOOR, int G>
void lanes_forward(const Lanes* ln, float* obase, int64_t n, const float* pw, const DMul<float>& dm, float eps,
                   int64_t L, const float* inv, Bad& bad) {
  const __m512 vhi = _mm512_set1_ps(dm.hi), vlo = _mm512_set1_ps(dm.lo), veps = _mm512_set1_ps(eps);
  const __m512 vlohi = _mm512_set1_ps(dm.lo * dm.hi);
  __m512 R1[G], R2[G], U1[G], S[G], E[G];  // R1, R2, U1: see recent_blocks
  Reader rx[G], ra[G], rb[G];
  Writer wr[G];
  for (int g = 0; g < G; ++g) {
    R1[g] = R2[g] = U1[g] = S[g] = E[g] = _mm512_setzero_ps();
    rx[g].L = ra[g].L = rb[g].L = wr[g].L = &ln[g];
    wr[g].obase = obase;
  }
  int64_t a = 0, b = -1;
  auto step = [&](int64_t t, int c) __attribute__((always_inline)) {
    __m512 u[G];
    for (int g = 0; g < G; ++g) u[g] = _mm512_load_ps(rx[g].buf[c]);
    if (BOTH || FLOOR) {
      const int64_t na = a_sched<BOTH, FLOOR>(t, L);
      while (a < na) {  // x_a leaves the window
        const __m512 p = _mm512_set1_ps(pw[t - a]);
        for (int g = 0; g < G; ++g) {
          const __m512 xa = ra[g].get(a);
          u[g] = _mm512_fnmadd_ps(p, xa, u[g]);
          if (FLOOR) E[g] = _mm512_add_ps(E[g], xa);
          if (BOTH && !FLOOR) S[g] = _mm512_fmadd_ps(p, xa, S[g]);  // ... straight into the early region
        }
        ++a;
      }
    }
    for (int g = 0; g < G; ++g) {
      const __m512 r = _mm512_fmadd_ps(vhi, R1[g], _mm512_fmadd_ps(vlohi, R2[g], _mm512_fmadd_ps(vlo, U1[g], u[g])));
      R2[g] = R1[g];
      R1[g] = r;
      U1[g] = u[g];
    }
    if (BOTH && FLOOR) {
      const int64_t nb = b_sched<BOTH, FLOOR>(t, L);
      while (b < nb) {  // x_b leaves the middle for the early region
        ++b;
        const __m512 p = _mm512_set1_ps(pw[b]);
        for (int g = 0; g < G; ++g) {
          const __m512 xb = rb[g].get(b);
          S[g] = _mm512_fmadd_ps(p, xb, S[g]);
          E[g] = _mm512_sub_ps(E[g], xb);
        }
      }
    }
    for (int g = 0; g < G; ++g) {
      __m512 z = R1[g];
      if (BOTH) z = _mm512_add_ps(z, S[g]);
      if (FLOOR) z = _mm512_fmadd_ps(veps, E[g], z);
      if (inv) z = _mm512_mul_ps(z, _mm512_set1_ps(inv[t]));  // normalised: z_t / N_t
      _mm512_store_ps(wr[g].buf[c], z);
    }
  };
  for (int64_t t0 = 0; t0 < n; t0 += 16) {  // tiles of 16 steps: main stream in, outputs out
    for (int g = 0; g < G; ++g) rx[g].fill(t0);
    if (t0 + 16 <= n) {
#pragma GCC unroll 16
      for (int c = 0; c < 16; ++c) step(t0 + c, c);
    } else {
      for (int c = 0; c < n - t0; ++c) step(t0 + c, c);
    }
    for (int g = 0; g < G; ++g) wr[g].flush(t0);
  }
  for (int g = 0; g < G; ++g)
    if (any_nonfinite(R1[g])) bad.mark();
}


template <bool BOTH, bool FLOOR, int G>
void lanes_transpose(const Lanes* ln, float* obase, int64_t n, const float* pw, const DMul<float>& dm, float eps,
                     int64_t L, const float* inv, Bad& bad) {
  const __m512 vhi = _mm512_set1_ps(dm.hi), vlo = _mm512_set1_ps(dm.lo), veps = _mm512_set1_ps(eps);
  const __m512 vlohi = _mm512_set1_ps(dm.lo * dm.hi);
  __m512 R1[G], R2[G], U1[G], Us[G], E[G];
  Reader ry[G], rA[G], rB[G];
  Writer wr[G];
  for (int g = 0; g < G; ++g) {
    R1[g] = R2[g] = U1[g] = Us[g] = E[g] = _mm512_setzero_ps();
    ry[g].L = rA[g].L = rB[g].L = wr[g].L = &ln[g];
    ry[g].inv = rA[g].inv = rB[g].inv = inv;  // normalised: every read of y is y_t / N_t
    wr[g].obase = obase;
  }
  int64_t Acur = n - 1, Bcur = n;
  auto step = [&](int64_t j, int c) __attribute__((always_inline)) {
    __m512 u[G];
    for (int g = 0; g < G; ++g) u[g] = _mm512_load_ps(ry[g].buf[c]);
    if (BOTH || FLOOR) {
      const int64_t nA = std::min(A_sched<BOTH, FLOOR>(j, L), n - 1);
      while (Acur > nA) {  // y_A leaves the window
        const __m512 p = _mm512_set1_ps(pw[Acur - j]);
        for (int g = 0; g < G; ++g) {
          const __m512 ya = rA[g].get(Acur);
          u[g] = _mm512_fnmadd_ps(p, ya, u[g]);
          if (FLOOR) E[g] = _mm512_add_ps(E[g], ya);
          if (BOTH && !FLOOR) Us[g] = _mm512_add_ps(Us[g], ya);  // ... straight into the early region
        }
        --Acur;
      }
    }
    for (int g = 0; g < G; ++g) {
      const __m512 r = _mm512_fmadd_ps(vhi, R1[g], _mm512_fmadd_ps(vlohi, R2[g], _mm512_fmadd_ps(vlo, U1[g], u[g])));
      R2[g] = R1[g];
      R1[g] = r;
      U1[g] = u[g];
    }
    if (BOTH && FLOOR) {
      const int64_t nB = std::min(B_sched<BOTH, FLOOR>(j, L), n);
      while (Bcur > nB) {  // y_B leaves the middle for the early region
        --Bcur;
        for (int g = 0; g < G; ++g) {
          const __m512 yb = rB[g].get(Bcur);
          Us[g] = _mm512_add_ps(Us[g], yb);
          E[g] = _mm512_sub_ps(E[g], yb);
        }
      }
    }
    const __m512 pj = _mm512_set1_ps(pw[j]);
    for (int g = 0; g < G; ++g) {
      __m512 z = R1[g];
      if (BOTH) z = _mm512_fmadd_ps(pj, Us[g], z);
      if (FLOOR) z = _mm512_fmadd_ps(veps, E[g], z);
      _mm512_store_ps(wr[g].buf[c], z);
    }
  };
  for (int64_t j0 = (n - 1) & ~int64_t(15); j0 >= 0; j0 -= 16) {
    for (int g = 0; g < G; ++g) ry[g].fill(j0);
    if (j0 + 16 <= n) {
#pragma GCC unroll 16
      for (int c = 15; c >= 0; --c) step(j0 + c, c);
    } else {
      for (int c = static_cast<int>(n - 1 - j0); c >= 0; --c) step(j0 + c, c);
    }
    for (int g = 0; g < G; ++g) wr[g].flush(j0);
  }
  for (int g = 0; g < G; ++g)
    if (any_nonfinite(R1[g])) bad.mark();
}


template <int G>
void lanes_dispatch(const Lanes* ln, float* out, int64_t n, const float* pw, const DMul<float>& dm, float eps,
                    const Sched& s, bool transpose, const float* inv, Bad& bad) {
  const int64_t L = s.L;
#define CL_LANES(B, F)                                                   \
  if (transpose)                                                         \
    lanes_transpose<B, F, G>(ln, out, n, pw, dm, eps, L, inv, bad);      \
  else                                                                   \
    lanes_forward<B, F, G>(ln, out, n, pw, dm, eps, L, inv, bad);
  if (s.both) {
    if (s.floor) { CL_LANES(true, true) } else { CL_LANES(true, false) }
  } else {
    if (s.floor) { CL_LANES(false, true) } else { CL_LANES(false, false) }
  }
#undef CL_LANES
}
#endif  // CREDITLIB_AVX512

// ------------------------------------------------------------------------------------ drivers
Sched make_sched(bool both, int64_t L, int64_t maxlen, bool normalize) {
  Sched s;
  s.both = both;
  s.normalize = normalize;
  s.Lraw = L;
  s.L = L;
  s.floor = L >= 0 && L < maxlen - 1;  // otherwise no lag exceeds L: the floor never binds
  if (!s.floor) s.L = kInf;
  return s;
}

template <typename acc_t>
void scalar_rows(const acc_t* x, const uint8_t* m, acc_t* out, int64_t R, int64_t T, double d, double eps,
                 const Sched& s, bool transpose, Bad& bad) {
  const std::vector<acc_t> pw = power_table<acc_t>(d, T);
  const auto invt = s.normalize ? cached_inv_row_sums<acc_t>(d, eps, s.Lraw, s.both, T, 0) : nullptr;
  const acc_t* inv = invt ? invt->data() : nullptr;
  const DMul<acc_t> dm(d);
  const acc_t e = static_cast<acc_t>(eps);
  at::parallel_for(0, R, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const uint8_t* mr = m ? m + r * T : nullptr;
      if (transpose)
        row_transpose<acc_t>(x + r * T, mr, T, out + r * T, pw.data(), dm, e, s, inv, bad);
      else
        row_forward<acc_t>(x + r * T, mr, T, out + r * T, pw.data(), dm, e, s, inv, bad);
    }
  });
}

template <typename acc_t>
void scalar_segments(const acc_t* x, const int64_t* cu, int64_t S, acc_t* out, double d, double eps,
                     const Sched& s, bool transpose, int64_t maxlen, Bad& bad) {
  const std::vector<acc_t> pw = power_table<acc_t>(d, maxlen);
  const auto invt = s.normalize ? cached_inv_row_sums<acc_t>(d, eps, s.Lraw, s.both, maxlen, 0) : nullptr;
  const acc_t* inv = invt ? invt->data() : nullptr;
  const DMul<acc_t> dm(d);
  const acc_t e = static_cast<acc_t>(eps);
  at::parallel_for(0, S, 1, [&](int64_t s0, int64_t s1) {
    for (int64_t i = s0; i < s1; ++i) {
      const int64_t o = cu[i], n = cu[i + 1] - cu[i];
      if (n <= 0) continue;
      if (transpose)
        row_transpose<acc_t>(x + o, nullptr, n, out + o, pw.data(), dm, e, s, inv, bad);
      else
        row_forward<acc_t>(x + o, nullptr, n, out + o, pw.data(), dm, e, s, inv, bad);
    }
  });
}

#if CREDITLIB_AVX512
// Runs path (2) over groups of 16 (offset, length) lanes.
void lanes_groups(const float* x, float* out, const std::vector<int64_t>& off, const std::vector<int64_t>& len,
                  double d, double eps, const Sched& s, bool transpose, int64_t maxlen, Bad& bad) {
  constexpr int G = 1;  // groups of 16 lanes sharing one schedule (2 was slower here)
  const std::vector<float> pw = power_table<float>(d, maxlen);
  // normalised: 1/N_k, padded so that a 16-column tile past the longest lane reads zeros
  const auto invt = s.normalize ? cached_inv_row_sums<float>(d, eps, s.Lraw, s.both, maxlen, 16) : nullptr;
  const float* inv = invt ? invt->data() : nullptr;
  const DMul<float> dm(d);
  const int64_t nlanes = static_cast<int64_t>(off.size());
  const int64_t nunits = (nlanes + 16 * G - 1) / (16 * G);
  at::parallel_for(0, nunits, 1, [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1; ++u) {
      Lanes ln[G];
      int64_t n = 0;
      for (int g = 0; g < G; ++g) {
        ln[g].base = x;
        for (int l = 0; l < 16; ++l) {
          const int64_t i = (u * G + g) * 16 + l;
          ln[g].off[l] = i < nlanes ? off[i] : 0;
          ln[g].len[l] = i < nlanes ? len[i] : 0;
          n = std::max(n, ln[g].len[l]);
        }
      }
      if (n == 0) continue;
      for (int g = 0; g < G; ++g) {
        ln[g].minlen = ln[g].len[0];
        for (int l = 1; l < 16; ++l) ln[g].minlen = std::min(ln[g].minlen, ln[g].len[l]);
      }
      lanes_dispatch<G>(ln, out, n, pw.data(), dm, static_cast<float>(eps), s, transpose, inv, bad);
    }
  });
}
#endif

#if CREDITLIB_AVX512
// Path (2) over a subset of the rows of a padded [R, T] float32 tensor: rows whose valid tokens form
// one contiguous run (no mask, left/right padding) are scanned in place; the others are compacted into
// a scratch buffer, scanned there, and expanded back.
void lanes_rows(const float* xp, const uint8_t* m, float* op, int64_t T, const std::vector<int64_t>& rows,
                double d, double eps, const Sched& s, bool transpose, Bad& bad) {
  const int64_t nr = static_cast<int64_t>(rows.size());
  std::vector<int64_t> off, len;
  std::vector<RowInfo> info(m ? nr : 0);
  if (m) {
    at::parallel_for(0, nr, 16, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) info[i] = analyse_row(m + rows[i] * T, T);
    });
  }
  off.reserve(nr);
  len.reserve(nr);
  std::vector<int64_t> other_i;  // index into rows / info
  for (int64_t i = 0; i < nr; ++i) {
    const int64_t r = rows[i];
    if (!m) {
      off.push_back(r * T);
      len.push_back(T);
      continue;
    }
    const RowInfo& ri = info[i];
    if (ri.count > 0 && ri.last - ri.first + 1 != ri.count) {
      other_i.push_back(i);
      continue;
    }
    float* orow = op + r * T;  // zero the masked positions around the run
    const int64_t first = ri.count ? ri.first : T, last = ri.count ? ri.last : T - 1;
    if (first > 0) std::memset(orow, 0, sizeof(float) * first);
    if (last < T - 1) std::memset(orow + last + 1, 0, sizeof(float) * (T - 1 - last));
    if (ri.count) {
      off.push_back(r * T + first);
      len.push_back(ri.count);
    }
  }
  if (!off.empty()) lanes_groups(xp, op, off, len, d, eps, s, transpose, T, bad);
  if (!other_i.empty()) {
    const int64_t no = static_cast<int64_t>(other_i.size());
    std::vector<int64_t> soff(no), slen(no);
    int64_t total = 0;
    for (int64_t k = 0; k < no; ++k) {
      soff[k] = total;
      slen[k] = info[other_i[k]].count;
      total += slen[k] + 16;  // slack: compaction stores whole vectors
    }
    ScratchBuf scr(2 * (total + 16));  // uninitialised, reused across calls (no page faults)
    float* const sin = scr.get();
    float* const sout = sin + total + 16;
    at::parallel_for(0, no, 1, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        const int64_t r = rows[other_i[k]];
        compact_row(xp + r * T, m + r * T, T, sin + soff[k]);
      }
    });
    lanes_groups(sin, sout, soff, slen, d, eps, s, transpose, T, bad);
    at::parallel_for(0, no, 1, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        const int64_t r = rows[other_i[k]];
        expand_row(sout + soff[k], m + r * T, T, op + r * T);
      }
    });
  }
}
#endif

// Sequence style: out = mean of the valid inputs at the valid positions, 0 elsewhere (sum in float64;
// masked inputs are selected away, never multiplied, so NaN/inf there cannot leak).
template <typename acc_t>
void sequence_run(const acc_t* x, const uint8_t* m, int64_t n, acc_t* out, Bad& bad) {
  double sum = 0.0;
  int64_t cnt = 0;
  if (m) {
    for (int64_t i = 0; i < n; ++i) {
      const bool v = m[i] != 0;
      sum += v ? static_cast<double>(x[i]) : 0.0;
      cnt += v;
    }
  } else {
    for (int64_t i = 0; i < n; ++i) sum += static_cast<double>(x[i]);
    cnt = n;
  }
  bad.check(sum);
  const acc_t mean = cnt ? static_cast<acc_t>(sum / static_cast<double>(cnt)) : acc_t(0);
  if (m) {
    for (int64_t i = 0; i < n; ++i) out[i] = m[i] ? mean : acc_t(0);
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = mean;
  }
}

#if CREDITLIB_AVX512
// float32, AVX-512: masked loads (masked lanes never read), float64 accumulators, masked stores.
template <>
void sequence_run<float>(const float* x, const uint8_t* m, int64_t n, float* out, Bad& bad) {
  __m512d s0 = _mm512_setzero_pd(), s1 = _mm512_setzero_pd();
  int64_t cnt = 0;
  for (int64_t c = 0; c < n; c += 16) {
    __mmask16 k = count_mask(n - c);
    if (m) {
      const __m128i mb = _mm_maskz_loadu_epi8(k, m + c);
      k = _mm_test_epi8_mask(mb, mb);
    }
    const __m512 v = _mm512_maskz_loadu_ps(k, x + c);
    s0 = _mm512_add_pd(s0, _mm512_cvtps_pd(_mm512_castps512_ps256(v)));
    s1 = _mm512_add_pd(s1, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1))));
    cnt += __builtin_popcount(static_cast<unsigned>(k));
  }
  const double sum = _mm512_reduce_add_pd(_mm512_add_pd(s0, s1));
  bad.check(sum);
  const __m512 mean = _mm512_set1_ps(cnt ? static_cast<float>(sum / static_cast<double>(cnt)) : 0.0f);
  for (int64_t c = 0; c < n; c += 16) {
    const __mmask16 w = count_mask(n - c);
    __mmask16 k = w;
    if (m) {
      const __m128i mb = _mm_maskz_loadu_epi8(w, m + c);
      k = _mm_test_epi8_mask(mb, mb);
    }
    _mm512_mask_storeu_ps(out + c, w, _mm512_maskz_mov_ps(k, mean));
  }
}
#endif

template <typename acc_t>
void sequence_scan(const acc_t* x, const uint8_t* m, const int64_t* cu, int64_t R, int64_t T, acc_t* out, Bad& bad) {
  at::parallel_for(0, R, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      if (cu)
        sequence_run<acc_t>(x + cu[r], nullptr, cu[r + 1] - cu[r], out + cu[r], bad);
      else
        sequence_run<acc_t>(x + r * T, m ? m + r * T : nullptr, T, out + r * T, bad);
    }
  });
}

torch::Tensor trace_scan_float_like(const torch::Tensor& x, const c10::optional<torch::Tensor>& mask,
                                    const c10::optional<torch::Tensor>& cu, double d, double eps, int64_t L,
                                    int64_t kind, bool normalize, bool transpose, Bad& bad) {
  const bool is_f64 = x.scalar_type() == at::kDouble;
  const bool both = kind == 1;
  auto out = torch::empty_like(x);
  if (kind == 2) {  // sequence (its own transpose)
    const int64_t* cp = cu.has_value() ? cu->data_ptr<int64_t>() : nullptr;
    const int64_t R = cp ? cu->numel() - 1 : x.size(0), T = cp ? 0 : x.size(1);
    const uint8_t* m = (!cp && mask.has_value()) ? mask->data_ptr<uint8_t>() : nullptr;
    if (is_f64)
      sequence_scan<double>(x.data_ptr<double>(), m, cp, R, T, out.data_ptr<double>(), bad);
    else
      sequence_scan<float>(x.data_ptr<float>(), m, cp, R, T, out.data_ptr<float>(), bad);
    return out;
  }
  if (cu.has_value()) {
    const torch::Tensor& c = *cu;
    const int64_t S = c.numel() - 1;
    const int64_t* cp = c.data_ptr<int64_t>();
    int64_t maxlen = 0;
    for (int64_t i = 0; i < S; ++i) maxlen = std::max(maxlen, cp[i + 1] - cp[i]);
    const Sched s = make_sched(both, L, maxlen, normalize);
    if (is_f64) {
      scalar_segments<double>(x.data_ptr<double>(), cp, S, out.data_ptr<double>(), d, eps, s, transpose, maxlen, bad);
      return out;
    }
#if CREDITLIB_AVX512
    std::vector<int64_t> off(S), len(S);
    for (int64_t i = 0; i < S; ++i) {
      off[i] = cp[i];
      len[i] = cp[i + 1] - cp[i];
    }
    lanes_groups(x.data_ptr<float>(), out.data_ptr<float>(), off, len, d, eps, s, transpose, maxlen, bad);
#else
    scalar_segments<float>(x.data_ptr<float>(), cp, S, out.data_ptr<float>(), d, eps, s, transpose, maxlen, bad);
#endif
    return out;
  }

  const int64_t R = x.size(0), T = x.size(1);
  const uint8_t* m = mask.has_value() ? mask->data_ptr<uint8_t>() : nullptr;
  const Sched s = make_sched(both, L, T, normalize);
  if (is_f64) {
    scalar_rows<double>(x.data_ptr<double>(), m, out.data_ptr<double>(), R, T, d, eps, s, transpose, bad);
    return out;
  }
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
#if CREDITLIB_AVX512
  if (!s.both && !s.floor) {
    const DMul<float> dm(d);
    constexpr int NB = 1;  // more interleaved row blocks were slower here (more memory streams)
    const int64_t nblk = (R + 16 * NB - 1) / (16 * NB);
    // normalised: 1/N by column (right-padded rows); blocks holding any other row are redone with a
    // per-lane gather of 1/N
    const auto invt = s.normalize ? cached_inv_row_sums<float>(d, eps, s.Lraw, false, T, 16) : nullptr;
    const float* inv = invt ? invt->data() : nullptr;
    at::parallel_for(0, nblk, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t row0 = b * 16 * NB;
        bool done;
#define CL_BLOCKS(MK, RV)                                                             \
  done = inv ? recent_blocks<NB, MK, RV, true>(xp, m, op, R, T, row0, bad, dm, inv)        \
             : recent_blocks<NB, MK, RV, false>(xp, m, op, R, T, row0, bad, dm);
        if (m) {
          if (transpose) { CL_BLOCKS(true, true) } else { CL_BLOCKS(true, false) }
          if (!done)
            done = transpose ? recent_blocks<NB, true, true, true, true>(xp, m, op, R, T, row0, bad, dm, inv)
                             : recent_blocks<NB, true, false, true, true>(xp, m, op, R, T, row0, bad, dm, inv);
        } else {
          if (transpose) { CL_BLOCKS(false, true) } else { CL_BLOCKS(false, false) }
        }
#undef CL_BLOCKS
        TORCH_CHECK(done, "creditlib trace kernel: a block was left unfinished");
      }
    });
    return out;
  }
  std::vector<int64_t> rows(static_cast<size_t>(R));
  for (int64_t r = 0; r < R; ++r) rows[r] = r;
  lanes_rows(xp, m, op, T, rows, d, eps, s, transpose, bad);
#else
  scalar_rows<float>(xp, m, op, R, T, d, eps, s, transpose, bad);
#endif
  return out;
}

}  // namespace

// Returns (out, nonfinite): nonfinite is true when some row's carry ended NaN/inf (a NaN/inf valid
// input, or an overflow); the caller then redoes those rows on the careful path.
std::tuple<torch::Tensor, bool> trace_scan(torch::Tensor x, c10::optional<torch::Tensor> mask,
                                           c10::optional<torch::Tensor> cu_seqlens, double d, double eps, int64_t L,
                                           int64_t kind, bool normalize, bool transpose) {
  TORCH_CHECK(x.device().is_cpu(), "x must be a CPU tensor");
  TORCH_CHECK(x.is_contiguous(), "x must be contiguous");
  TORCH_CHECK(d >= 0.0 && d <= 1.0, "d must be in [0, 1], got ", d);
  TORCH_CHECK(eps >= 0.0 && eps <= 1.0, "eps must be in [0, 1], got ", eps);
  TORCH_CHECK(kind >= 0 && kind <= 2, "kind must be 0 (recent), 1 (both) or 2 (sequence), got ", kind);
  const auto st = x.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
              "x must be float16, bfloat16, float32 or float64, got ", st);
  if (cu_seqlens.has_value()) {
    TORCH_CHECK(x.dim() == 1, "packed x must be 1-D [N]");
    TORCH_CHECK(!mask.has_value(), "mask must be None with cu_seqlens");
    const auto& c = *cu_seqlens;
    TORCH_CHECK(c.device().is_cpu() && c.scalar_type() == at::kLong && c.dim() == 1 && c.numel() >= 1 && c.is_contiguous(),
                "cu_seqlens must be a contiguous CPU int64 tensor [S+1]");
    const int64_t* cp = c.data_ptr<int64_t>();
    TORCH_CHECK(cp[0] == 0 && cp[c.numel() - 1] == x.numel(), "cu_seqlens must start at 0 and end at N");
    for (int64_t i = 0; i + 1 < c.numel(); ++i) TORCH_CHECK(cp[i + 1] >= cp[i], "cu_seqlens must be non-decreasing");
  } else {
    TORCH_CHECK(x.dim() == 2, "padded x must be 2-D [R, T]");
    if (mask.has_value()) {
      const auto& m = *mask;
      TORCH_CHECK(m.device().is_cpu() && (m.scalar_type() == at::kByte || m.scalar_type() == at::kBool) &&
                      m.sizes() == x.sizes() && m.is_contiguous(),
                  "mask must be a contiguous CPU uint8 tensor of the shape of x");
    }
  }
  if (x.numel() == 0) return {torch::zeros_like(x), false};
  c10::optional<torch::Tensor> m8;
  if (mask.has_value()) m8 = mask->scalar_type() == at::kBool ? mask->view(at::kByte) : *mask;
  Bad bad;
  if (st == at::kHalf || st == at::kBFloat16) {
    auto xf = x.to(at::kFloat);
    auto out = trace_scan_float_like(xf, m8, cu_seqlens, d, eps, L, kind, normalize, transpose, bad).to(st);
    return {out, bad.hit.load()};
  }
  auto out = trace_scan_float_like(x, m8, cu_seqlens, d, eps, L, kind, normalize, transpose, bad);
  return {out, bad.hit.load()};
}

bool has_avx512() { return CREDITLIB_AVX512 != 0; }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("trace_scan", &trace_scan,
          "eligibility trace scan (z = W x, or W^T x when transpose); returns (z, some carry ended non-finite)",
          py::arg("x"), py::arg("mask"), py::arg("cu_seqlens"), py::arg("d"), py::arg("eps"), py::arg("L"),
          py::arg("kind"), py::arg("normalize"), py::arg("transpose"));
  mod.def("has_avx512", &has_avx512, "whether the AVX-512 paths were compiled in");
}
