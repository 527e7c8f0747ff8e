#include "tactic/select.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "parallel.hpp"
#include "score_buckets.hpp"
#include "simd.hpp"
#include "tail_sample.hpp"
#include "tactic/convert.hpp"

namespace tactic {

namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

void push_range(std::vector<RowRange>& v, int64_t b, int64_t e) {
  if (e <= b) return;
  if (!v.empty() && v.back().end == b) v.back().end = (int32_t)e;
  else v.push_back({(int32_t)b, (int32_t)e});
}

// Rows whose mark is set, as sorted disjoint ranges.
void ranges_from_marks(const uint8_t* mark, int64_t n, std::vector<RowRange>& out) {
  out.clear();
  for (int64_t r = 0; r < n; ++r)
    if (mark[r]) push_range(out, r, r + 1);
}

// out[j] = q . rows[j] for n contiguous float rows of length d.
TACTIC_HOT
void dot_many(const float* q, const float* rows, int64_t n, int64_t d, float* out) {
  dot_rows_any(q, rows, n, d, out);
}

// Exact scaled logits q.k_r for rows [r0, r1) of one KV head (rows of a head are contiguous)
// for the G query heads q [G, d] at once, converted to float 64 rows at a time: each row is
// converted once, then scored G times from cache. out[h * ld + r - r0] for head h.
void row_logits_group(const KVStore& st, int64_t layer, int64_t slot, int64_t head, int64_t r0,
                      int64_t r1, const float* q, int64_t g, float* out, int64_t ld,
                      std::vector<float>& buf) {
  constexpr int64_t kRows = 64;
  const int64_t d = st.config().head_dim;
  buf.resize(kRows * d);
  for (int64_t b = r0; b < r1; b += kRows) {
    const int64_t nb = std::min(kRows, r1 - b);
    load_floats(st.k_row(layer, slot, head, b), st.config().dtype, nb * d, buf.data());
    for (int64_t h = 0; h < g; ++h) dot_many(q + h * d, buf.data(), nb, d, out + h * ld + (b - r0));
  }
}

// The same for one query head q [d].
void row_logits(const KVStore& st, int64_t layer, int64_t slot, int64_t head, int64_t r0,
                int64_t r1, const float* q, float* out, std::vector<float>& buf) {
  row_logits_group(st, layer, slot, head, r0, r1, q, 1, out, 0, buf);
}

// sum_k exp(l[k] - m): a cluster's (or a row range's) exact mass, as exp(r - m) sum_k exp(l[k]
// - r) with r = max(m, max_k l[k]): eight terms at a time by exp_nonpos8, lanes summed in float
// and flushed to double every 128 terms (rel. error ~1e-6, far below the certificate's
// sampling error; libm's double exp per read row was a quarter of the certified CPU selection).
// m is where a caller's masses meet; a cluster may hold logits above it.
TACTIC_HOT
double exp_sum(const float* l, int64_t n, double m) {
  if (n <= 0) return 0.0;
  float top = -std::numeric_limits<float>::infinity();
  for (int64_t k = 0; k < n; ++k) top = top > l[k] ? top : l[k];
  const float mf = (float)m;
  const float r = (double)top > m || (double)mf != m ? top : mf;  // r >= every l[k]
  double e = 0;
  v8 acc = {};
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) {
    acc += exp_nonpos8(ld(l + k) - r);
    if ((k & 127) == 120) e += hsum(acc), acc = v8{};
  }
  if (k < n) {
    v8 x;
    for (int i = 0; i < 8; ++i) x[i] = k + i < n ? l[k + i] - r : -std::numeric_limits<float>::infinity();
    acc += exp_nonpos8(x);
  }
  e += hsum(acc);
  return r == mf && (double)mf == m ? e : std::exp((double)r - m) * e;
}

// Policies that score every row exactly (oracle, topk): references, not fast paths.
// oracle: each query head's own minimal top-P set; the KV head reads their union.
// topk: `budget` rows per KV head (the same unit as quest's and Tactic's union), the rows
// with the largest softmax probability under any of the group's query heads; every query
// head attends that whole set.
void select_exact(const KVStore& st, int64_t layer, int64_t slot, int64_t head, const float* q,
                  int64_t g, const SelectOptions& opt, int64_t budget, bool record,
                  SelectScratch& s, KVSelection& out) {
  const int64_t n = st.length(layer, slot), d = st.config().head_dim;
  const bool oracle = opt.policy == Policy::oracle;
  s.logit.resize(n);
  s.order.resize(n);
  s.mark.assign(n, 0);
  if (!oracle) {
    s.score.assign(n, 0.f);        // the group's largest probability per row
    s.mass.assign(g * n, 0.0);     // each head's probabilities, for its kept mass
  }
  std::vector<uint8_t> own;
  auto by = [](const std::vector<float>& key) {
    return [&key](int32_t a, int32_t b) { return key[a] != key[b] ? key[a] > key[b] : a < b; };
  };
  for (int64_t h = 0; h < g; ++h) {
    row_logits(st, layer, slot, head, 0, n, q + h * d, s.logit.data(), s.row);
    double m = -std::numeric_limits<double>::infinity();
    for (int64_t r = 0; r < n; ++r) m = std::max(m, (double)s.logit[r]);
    const double z = exp_sum(s.logit.data(), n, m);
    if (!oracle) {
      for (int64_t r = 0; r < n; ++r) {
        const double p = std::exp((double)s.logit[r] - m) / z;
        s.mass[h * n + r] = p;
        s.score[r] = std::max(s.score[r], (float)p);
      }
      continue;
    }
    std::iota(s.order.begin(), s.order.end(), 0);
    std::sort(s.order.begin(), s.order.end(), by(s.logit));
    int64_t take = 0;
    double mass = 0;
    if (opt.target >= 1.0) {
      take = n;
      mass = z;
    } else {
      while (take < n && mass < opt.target * z) mass += std::exp((double)s.logit[s.order[take++]] - m);
    }
    out.head_tokens[h] = take;
    out.est_mass[h] = z > 0 ? mass / z : kNaN;
    if (record) own.assign(n, 0);
    for (int64_t i = 0; i < take; ++i) {
      s.mark[s.order[i]] = 1;
      if (record) own[s.order[i]] = 1;
    }
    if (record) ranges_from_marks(own.data(), n, out.head_rows[h]);
  }
  if (!oracle) {
    const int64_t take = std::min<int64_t>(std::max<int64_t>(budget, 1), n);
    std::iota(s.order.begin(), s.order.end(), 0);
    std::partial_sort(s.order.begin(), s.order.begin() + take, s.order.end(), by(s.score));
    for (int64_t i = 0; i < take; ++i) s.mark[s.order[i]] = 1;
    for (int64_t h = 0; h < g; ++h) {
      double mass = 0;
      for (int64_t i = 0; i < take; ++i) mass += s.mass[h * n + s.order[i]];
      out.head_tokens[h] = take;
      out.est_mass[h] = mass;
    }
  }
  ranges_from_marks(s.mark.data(), n, out.rows);
  if (!oracle && record)
    for (int64_t h = 0; h < g; ++h) out.head_rows[h] = out.rows;
}

// Quest: positional pages, upper bound sum_k max(q_k min_k, q_k max_k) per page; GQA heads
// share one page set ranked by the largest bound of the group. Sinks and the recent segment
// are always read and count against the budget.
void select_quest(const KVStore& st, int64_t layer, int64_t slot, int64_t head, const float* q,
                  int64_t g, const SelectOptions& opt, int64_t budget, SelectScratch& s,
                  KVSelection& out) {
  const SlotState& ss = st.state(layer, slot);
  const int64_t n = ss.total(), d = st.config().head_dim, ps = opt.page_size;
  const int64_t np = (n + ps - 1) / ps;
  const float* lo = st.page_min(layer, slot, head);
  const float* hi = st.page_max(layer, slot, head);
  s.mark.assign(n, 0);
  int64_t used = 0;
  auto mark_rows = [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) used += !s.mark[r], s.mark[r] = 1;
  };
  mark_rows(0, ss.n_sink);
  mark_rows(ss.n_sink + ss.n_clustered, n);
  s.score.assign(np, -std::numeric_limits<float>::infinity());
  for (int64_t p = 0; p < np; ++p)
    for (int64_t h = 0; h < g; ++h) {
      const float* qh = q + h * d;
      float ub = 0.f;
      for (int64_t k = 0; k < d; ++k) ub += std::max(qh[k] * lo[p * d + k], qh[k] * hi[p * d + k]);
      s.score[p] = std::max(s.score[p], ub);
    }
  s.order.resize(np);
  std::iota(s.order.begin(), s.order.end(), 0);
  std::sort(s.order.begin(), s.order.end(), [&](int32_t a, int32_t b) {
    return s.score[a] != s.score[b] ? s.score[a] > s.score[b] : a < b;
  });
  for (int64_t i = 0; i < np && used < budget; ++i) {
    const int64_t p = s.order[i];
    mark_rows(p * ps, std::min(n, (p + 1) * ps));
  }
  ranges_from_marks(s.mark.data(), n, out.rows);
  for (int64_t h = 0; h < g; ++h) {
    out.head_tokens[h] = used;
    out.est_mass[h] = kNaN;
  }
}

enum : uint8_t { kUnread = 0, kHead = 1, kSample = 2, kChosen = 3, kShared = 4 };

struct CertifiedStop {
  double read;  // exact mass of the head's selection (exp(l - m) summed)
  double tail;  // estimated (unbiased) mass of the unread rest
};

// The certified stop rule (stop_rule = certified), per KV head and its G query heads:
//
//   0. First read (select_tactic's per-head loop, unchanged from the prior rule except that
//      it aims at P itself, margin 0): each head ranks clusters, scores its exact head,
//      calibrates the prior to it and takes the ranked prefix whose estimated mass reaches P.
//      Their union is what every head of the group attends.
//   Then, per query head, over that union (select_tactic's second pass calls this):
//   1. Exact read mass R: the sinks, the recent rows and every selected cluster are scored
//      exactly (the attention computes the same sum: nothing about R is estimated).
//   2. Tail sample, drawn once: n = tail_samples draws with replacement from the unread
//      clusters U, cluster j with probability pi_j = (w_j / W + |j| / |U|) / 2, where
//      w_j = |j| exp(score_j) is the ranking's prior and the size-proportional half keeps
//      every unread token's share >= 1 / (2 |U|) (a defensive mixture: a wrong prior costs
//      variance, never bias). Each drawn cluster is scored whole: Y_i = T_j / pi_j, T_j its
//      exact mass, is an unbiased (Hansen-Hurwitz) estimate of T(U), the unread mass.
//      Certainty clusters first: a cluster whose expected draw count n pi_j reaches 1 is
//      scored exactly once for one draw of the budget and leaves the sampled set (chosen from
//      the prior alone, so no bias; repeated draws of the top-prior clusters were where the
//      budget went). T_hat = their exact mass + the draws' mean over the rest.
//      (One token per draw was tried first: heavy single tokens in the tail made the
//      estimate skewed and the bound under-covered; bench/NOTES.md.)
//   3. Bound, once: T_up = mean Y + z_c sd(Y) / sqrt(n), z_c the normal quantile of
//      `confidence`, and Z_up = R + T_up, an upper bound on the softmax denominator Z.
//      Certified when R >= P Z_up (then R / Z >= P whenever Z <= Z_up).
//   4. Top-up (at most max_rounds, only while R < P Z_up): read the unread cluster holding
//      the largest draw (the sample's pointer to mass the ranking missed), then next-ranked
//      clusters until their prior, rescaled to the sample's estimate of the unread rest,
//      adds up to P Z_up - R. Score them exactly (R grows by exact mass, Z_up stays), check.
//   5. After the last round the selection stands; est_mass reports R / (R + T_hat), T_hat
//      the sample's estimate less the exact mass read since. The head's top-ups join the
//      union, so later heads of the group certify over them too.
// Cost per query head: at most tail_samples distinct clusters scored (K rows only; a cluster
// drawn twice is scored once) and the top-ups; the union's K rows are converted once for the
// group (logits_of), each head's dots taken from them.
// logits_of(j, h): cluster j's exact logits for query head h, from its first row (select_tactic
// scores a cluster once for the whole group).
template <class Rank, class Logits>
CertifiedStop certify(const KVStore& st, int64_t layer, int64_t slot, int64_t head, int64_t h,
                      const float* qh, const SelectOptions& opt, double z_conf, double m,
                      double a_mass, Rank& rank, int64_t take, Logits&& logits_of, SelectScratch& s) {
  const SlotState& ss = st.state(layer, slot);
  const int64_t c = st.num_clusters(layer, slot, head), base = ss.n_sink;
  const int32_t* off = st.offsets(layer, slot, head);
  auto csize = [&](int64_t j) { return (int64_t)off[j + 1] - off[j]; };
  auto read = [&](int64_t j) {  // exact mass of cluster j (a read joins the group's union)
    return s.mass[j] = exp_sum(logits_of(j, h), csize(j), m);
  };
  // 1. Exact read mass (the prior's prefix was only estimated so far).
  for (int32_t j : s.fresh) read(j);
  double R = a_mass;
  for (int64_t j = 0; j < c; ++j)
    if (s.state[j] != kUnread) R += s.mass[j];

  // 2. The tail sample. s.score holds the ranking score; w_j = s.prior[j] its prior mass (one
  // exp per cluster: the walk's sort, the proposal and the rounds read it many times).
  const int64_t n = opt.tail_samples, len = ss.total();
  s.prior.resize(c);
  double W = 0, U = 0;
  for (int64_t j = 0; j < c; ++j) {
    s.prior[j] = csize(j) * std::exp((double)s.score[j] - m);
    if (s.state[j] == kUnread) W += s.prior[j], U += csize(j);
  }
  s.cdf.assign(c, 0.0);
  s.drawn.assign(c, -1.0);
  s.certain.assign(c, 0);
  s.draw_cluster.assign(n, -1);
  s.draw_y.assign(n, 0.0);
  auto exact = [&](int64_t j) {  // a drawn cluster's exact mass, scored once
    double& e = s.drawn[j];
    if (e < 0) {
      row_logits(st, layer, slot, head, base + off[j], base + off[j + 1], qh,
                 s.logit.data() + off[j], s.row);
      e = exp_sum(s.logit.data() + off[j], csize(j), m);
    }
    return e;
  };
  auto w = [&](int64_t j) { return s.prior[j]; };
  auto open = [&](int64_t j) { return s.state[j] == kUnread && !s.certain[j]; };
  const bool prior_ok = W > 0 && std::isfinite(W);
  // Certainty clusters: one whose expected draw count n_left pi_j reaches 1 would be drawn
  // (about) surely and repeatedly; it is scored exactly once instead, for one draw of the
  // budget, and leaves the sampled set (a choice made from the prior alone: no bias).
  double t_certain = 0, Wr = W, Ur = U;
  int64_t n_left = n;
  // pi_j over the totals (wt, ut) of the clusters still open; a certainty cluster leaves them.
  auto pi_over = [&](int64_t j, double wt, double ut) {
    return prior_ok && wt > 0 ? 0.5 * (w(j) / wt + csize(j) / ut) : csize(j) / ut;
  };
  auto make_certain = [&](int64_t j) {
    s.certain[j] = 1;
    t_certain += exact(j);
    Wr -= w(j);
    Ur -= csize(j);
    --n_left;
  };
  // One walk: the unread clusters in the order of their share at the first totals (index order
  // on ties), each taken while n_left pi_j >= 1 over the totals less those taken before it (on a
  // GPU: an argmax over a short list per step, not ~30 dependent passes over every cluster). At
  // most n - 2 are taken, so only the first n of that order are sorted.
  std::vector<int32_t>& by = s.walk;
  std::vector<double>& share = s.cdf;  // the proposal's CDF below overwrites every entry
  by.clear();
  for (int64_t j = 0; j < c; ++j)
    if (open(j)) by.push_back((int32_t)j), share[j] = pi_over(j, W, U);
  const auto first = by.begin() + std::min<int64_t>((int64_t)by.size(), n);
  std::partial_sort(by.begin(), first, by.end(),
                    [&](int32_t x, int32_t y) { return share[x] != share[y] ? share[x] > share[y] : x < y; });
  for (auto it = by.begin(); it != first; ++it) {
    const int32_t j = *it;
    if (!(Ur > 0 && n_left > 2) || n_left * pi_over(j, Wr, Ur) < 1) break;
    make_certain(j);
  }
  Wr = Ur = 0;  // the open totals recomputed, not subtracted (cancellation)
  for (int64_t j = 0; j < c; ++j)
    if (open(j)) Wr += w(j), Ur += csize(j);
  if (Ur > 0) {
    double acc = 0;
    const bool rest_ok = prior_ok && Wr > 0;
    for (int64_t j = 0; j < c; ++j) {
      if (open(j)) acc += rest_ok ? 0.5 * (w(j) / Wr + csize(j) / Ur) : csize(j) / Ur;
      s.cdf[j] = acc;
    }
    const uint64_t key = draw_key(layer, slot, head, h, len);
    for (int64_t i = 0; i < n_left; ++i) {
      const double u = unit_draw(key + 2 * (uint64_t)i) * acc;
      int64_t j = std::upper_bound(s.cdf.begin(), s.cdf.end(), u) - s.cdf.begin();
      j = std::min(j, c - 1);
      while (j > 0 && !open(j)) --j;  // u landed on a flat step (rounding)
      const double pi = (s.cdf[j] - (j ? s.cdf[j - 1] : 0.0)) / acc;
      if (!(pi > 0) || !open(j)) continue;  // counts as a zero draw
      // The whole drawn cluster is scored exactly (no within-cluster variance).
      s.draw_cluster[i] = (int32_t)j;
      s.draw_y[i] = exact(j) / pi;
    }
  } else {
    n_left = 0;  // every unread cluster is a certainty cluster: the tail is exact
  }
  // 3. One bound on the total: Z_up = R0 + T_up(U0) >= Z with probability ~confidence. It is
  // not re-estimated after top-ups (re-using the sample on the shrunken set would bias it
  // low: the top-up reads exactly the clusters where the sample found mass); mass read later
  // is exact, so R / Z_up only grows and R >= P Z_up certifies R / Z >= P.
  double sum = 0, sq = 0;
  for (int64_t i = 0; i < n_left; ++i) sum += s.draw_y[i], sq += s.draw_y[i] * s.draw_y[i];
  const double mean = n_left ? sum / n_left : 0.0;
  const double var = n_left > 1 ? std::max(0.0, (sq - n_left * mean * mean) / (n_left - 1)) : 0.0;
  const double t0 = t_certain + mean;
  const double z_up = R + t0 + (n_left ? z_conf * std::sqrt(var / n_left) : 0.0), r0 = R,
               P = opt.target;
  // 4. Top-up rounds.
  for (int round = 0; round < opt.max_rounds && R < P * z_up; ++round) {
    // The rest's prior, rescaled to the sample's estimate of what is still unread.
    double w_rest = 0;
    for (int64_t j = 0; j < c; ++j)
      if (s.state[j] == kUnread) w_rest += w(j);
    const double scale = w_rest > 0 ? std::max(t0 - (R - r0), 0.0) / w_rest : 0.0;
    double need = P * z_up - R;
    auto add = [&](int64_t j) {
      s.state[j] = kChosen;
      R += read(j);
      need -= scale * w(j);
    };
    int64_t hot = -1;  // the unread cluster of the largest draw
    double best = 0;
    for (int64_t i = 0; i < n_left; ++i) {
      const int32_t j = s.draw_cluster[i];
      if (j >= 0 && s.state[j] == kUnread && s.draw_y[i] > best) best = s.draw_y[i], hot = j;
    }
    if (hot >= 0) add(hot);
    for (; take < c && need > 0; ++take) {
      const int64_t j = rank(take);
      if (s.state[j] == kUnread) add(j);
    }
    if (take >= c) break;  // everything is read
  }
  const double t_hat = std::max(t0 - (R - r0), 0.0);
  return {R, t_hat};
}

// Every cluster's ranking score q.c + spread_w * |q|^2 s_c / 2 (the prior's exponent too).
void score_clusters(const float* qh, const float* cent, const float* spread, int64_t c, int64_t d,
                    double spread_w, float* score) {
  dot_many(qh, cent, c, d, score);
  if (spread_w > 0) {
    float qq = 0.f;
    for (int64_t k = 0; k < d; ++k) qq = std::fma(qh[k], qh[k], qq);
    const float w = 0.5f * (float)spread_w * qq;
    for (int64_t j = 0; j < c; ++j) score[j] = std::fma(w, spread[j], score[j]);
  }
}

// The clusters by descending score (ties: lower index first), sorted lazily: the stop point
// usually comes after a small share of the clusters, and a full sort of thousands of scores per
// head was the largest cost of a selection. rank(k) sorts in chunks (nth_element, then sort)
// as far as k.
struct LazyRank {
  std::vector<int32_t>& order;
  const std::vector<float>& score;
  int64_t c, sorted = 0;
  LazyRank(std::vector<int32_t>& o, const std::vector<float>& sc, int64_t n) : order(o), score(sc), c(n) {
    std::iota(order.begin(), order.begin() + c, 0);
  }
  // Resumed from an earlier LazyRank's order and sorted count over the same scores: the ranks
  // are the same (the order is total: ties by index), without sorting the prefix again.
  LazyRank(std::vector<int32_t>& o, const std::vector<float>& sc, int64_t n, int64_t done)
      : order(o), score(sc), c(n), sorted(done) {}
  int64_t operator()(int64_t k) {
    if (k >= sorted) {
      auto by_score = [&](int32_t a, int32_t b) { return score[a] != score[b] ? score[a] > score[b] : a < b; };
      const int64_t e = std::min<int64_t>(c, std::max<int64_t>({k + 1, 2 * sorted, 64}));
      if (e < c) std::nth_element(order.begin() + sorted, order.begin() + e, order.begin() + c, by_score);
      std::sort(order.begin() + sorted, order.begin() + e, by_score);
      sorted = e;
    }
    return (int64_t)order[k];
  }
};

// One KV head's clustered store as the selections read it: counts, cluster offsets,
// centroids and spreads.
struct ClusterView {
  const SlotState& ss;
  int64_t d, nclu, base, c, n, always;
  const int32_t* off;
  const float* cent;
  const float* spread;
  ClusterView(const KVStore& st, int64_t layer, int64_t slot, int64_t head)
      : ss(st.state(layer, slot)), d(st.config().head_dim), nclu(ss.n_clustered), base(ss.n_sink),
        c(st.num_clusters(layer, slot, head)), n(ss.total()), always(ss.n_sink + ss.n_recent),
        off(st.offsets(layer, slot, head)), cent(st.centroids(layer, slot, head)),
        spread(st.spreads(layer, slot, head)) {}
  int64_t size(int64_t j) const { return (int64_t)off[j + 1] - off[j]; }
};

void select_tactic(const KVStore& st, int64_t layer, int64_t slot, int64_t head, const float* q,
                   int64_t g, const SelectOptions& opt, bool record, SelectScratch& s,
                   KVSelection& out) {
  const ClusterView cv(st, layer, slot, head);
  const SlotState& ss = cv.ss;
  const int64_t d = cv.d, nclu = cv.nclu, base = cv.base, c = cv.c, n = cv.n, always = cv.always;
  const int32_t* off = cv.off;
  const float* cent = cv.cent;
  const float* spread = cv.spread;
  auto csize = [&](int64_t j) { return cv.size(j); };

  s.mark.assign(std::max<int64_t>(c, 1), 0);
  // Fallback: too few clusters for a meaningful estimate, or the target is everything.
  const bool all = c < opt.min_clusters || opt.target >= 1.0;
  if (c == 0 || all) {
    std::fill(s.mark.begin(), s.mark.end(), all ? 1 : 0);
    for (int64_t h = 0; h < g; ++h) {
      out.head_tokens[h] = all ? n : always;
      out.est_mass[h] = 1.0;
      if (record) out.head_rows[h] = {{0, (int32_t)n}};
    }
    out.rows.clear();
    push_range(out.rows, 0, n);
    return;
  }

  const bool certified = opt.stop_rule == StopRule::certified;
  // The prior rule aims above P against its estimate's error; the certified rule aims at P
  // itself for its first read and lets the bound decide the rest.
  const double p_eff =
      certified ? opt.target : std::min(1.0, opt.target + opt.margin * (1.0 - opt.target));
  const double z_conf = certified ? normal_quantile(opt.confidence) : 0.0;
  // The certified rule with head_fraction 0 reads no exact head: its first read comes from the
  // prior as it is (alpha 1), and the bound and top-ups carry the guarantee. The prior rule
  // always calibrates on at least one cluster.
  const bool no_head = certified && opt.head_fraction <= 0;
  s.score.resize(c);
  s.order.resize(c);
  s.state.resize(c);
  s.mass.resize(c);
  s.logit.resize(std::max<int64_t>(nclu, always));
  std::vector<uint8_t> own;
  // The exact head: ranked clusters while fewer than ~head_fraction of the tokens precede
  // them (at least one cluster); f(j) for each.
  const double head_tokens = std::max(1.0, opt.head_fraction * nclu);
  auto for_exact_head = [&](LazyRank& rank, auto&& f) {
    int64_t tokens = 0;
    for (int64_t i = 0; i < c && (i == 0 || tokens < head_tokens); ++i) {
      f(rank(i));
      tokens += csize(rank(i));
    }
  };
  // group_head: the union of the G heads' exact heads, every head's first read (each head is
  // scored again below; on the CPU that is c x d per head, small next to the exact reads).
  std::vector<uint8_t> ghead;
  if (opt.group_head && !no_head && g > 1) {
    ghead.assign(c, 0);
    for (int64_t h = 0; h < g; ++h) {
      score_clusters(q + h * d, cent, spread, c, d, opt.spread, s.score.data());
      LazyRank rank(s.order, s.score, c);
      for_exact_head(rank, [&](int64_t j) { ghead[j] = 1; });
    }
  }
  // Cluster j's exact logits for head h, computed once for the group: a cluster read by one
  // head is read by others of the group (share_group's later heads, the certified rule's every
  // head over the union), so its K rows are converted once and scored for the heads [h0, h1)
  // that may read it (certified: all; prior: the asking head, and the later ones with
  // share_group). Kept compactly, a block of (h1 - h0) x |j| logits at s.group_at[j], so the
  // scratch grows with the rows read, not with G x the context. The pointer is valid until
  // the next scoring.
  s.group_logit.clear();
  s.group_at.assign(c, -1);
  s.group_heads.assign(2 * c, 0);  // [h0, h1) of the logits held for cluster j
  auto logits_of = [&](int64_t j, int64_t h) {  // head h's logit of the cluster's first row
    int32_t* held = &s.group_heads[2 * j];
    const int64_t sz = csize(j);
    if (!(held[0] <= h && h < held[1])) {
      const int64_t h0 = certified ? 0 : h, h1 = certified || opt.share_group ? g : h + 1;
      const int64_t at = (int64_t)s.group_logit.size();
      s.group_logit.resize(at + (h1 - h0) * sz);
      row_logits_group(st, layer, slot, head, base + off[j], base + off[j + 1], q + h0 * d, h1 - h0,
                       s.group_logit.data() + at, sz, s.row);
      held[0] = (int32_t)h0, held[1] = (int32_t)h1;
      s.group_at[j] = at;
    }
    return (const float*)(s.group_logit.data() + s.group_at[j] + (h - held[0]) * sz);
  };
  if (certified) {
    s.head_score.resize(g * c);
    s.head_order.resize(g * c);
    s.head_sorted.resize(g);
  }
  for (int64_t h = 0; h < g; ++h) {
    const float* qh = q + h * d;
    score_clusters(qh, cent, spread, c, d, opt.spread, s.score.data());
    LazyRank rank(s.order, s.score, c);
    if (opt.segments() > 0) rank(c - 1);  // the two-segment fit walks every rank
    std::fill(s.state.begin(), s.state.end(), kUnread);

    // Which ranked clusters are read exactly: the head (the group's with group_head, which
    // holds this head's own), then two sample segments.
    if (!ghead.empty()) {
      for (int64_t j = 0; j < c; ++j)
        if (ghead[j]) s.state[j] = kHead;
    } else if (!no_head) {
      for_exact_head(rank, [&](int64_t j) { s.state[j] = kHead; });
    }
    // rank_start[i]: token rank (0-based) where ranked cluster i begins.
    struct Segment { int64_t first, last; double x, y; } seg[2] = {};
    int64_t cum = 0, pos = 0;
    for (int sidx = 0; sidx < opt.segments(); ++sidx) {
      const double at = (sidx == 0 ? opt.sample_rank_1 : opt.sample_rank_2) * nclu;
      while (pos < c && cum + csize(s.order[pos]) <= at) cum += csize(s.order[pos++]);
      seg[sidx].first = pos;
      int64_t got = 0, p2 = pos, cum2 = cum;
      const double want = std::max(1.0, opt.sample_fraction * nclu);
      while (p2 < c && (p2 == pos || got < want)) {
        if (s.state[s.order[p2]] == kUnread) s.state[s.order[p2]] = kSample;
        got += csize(s.order[p2]);
        cum2 += csize(s.order[p2]);
        ++p2;
      }
      seg[sidx].last = p2;
      // Mean token rank (1-based) of the segment.
      seg[sidx].x = 0.5 * ((double)cum + 1 + (double)cum2);
      pos = p2;
      cum = cum2;
    }

    // Clusters another head of this group already chose are read for the union anyway:
    // score them exactly too, so this head counts their mass instead of adding its own.
    for (int64_t j = 0; j < c; ++j)
      if (opt.share_group && s.mark[j] && s.state[j] == kUnread) s.state[j] = kShared;

    // Exact logits of the always-read rows and of every read cluster.
    double m = -std::numeric_limits<double>::infinity();
    row_logits(st, layer, slot, head, 0, ss.n_sink, qh, s.logit.data(), s.row);
    double lsink_max = m;
    for (int64_t r = 0; r < ss.n_sink; ++r) lsink_max = std::max(lsink_max, (double)s.logit[r]);
    std::vector<float>& rec = s.row;  // reused below; logits of recent rows kept separately
    std::vector<float> recent(ss.n_recent), sink(s.logit.begin(), s.logit.begin() + ss.n_sink);
    row_logits(st, layer, slot, head, base + nclu, n, qh, recent.data(), rec);
    m = lsink_max;
    for (float v : recent) m = std::max(m, (double)v);
    // Per read cluster: exact logits (the group's).
    for (int64_t j = 0; j < c; ++j) {
      if (s.state[j] == kUnread) continue;
      const float* l = logits_of(j, h);
      for (int64_t k = 0; k < csize(j); ++k) m = std::max(m, (double)l[k]);
    }
    const double a_mass =
        exp_sum(sink.data(), (int64_t)sink.size(), m) + exp_sum(recent.data(), (int64_t)recent.size(), m);
    double read_exact = 0, read_prior = 0;
    for (int64_t j = 0; j < c; ++j) {
      if (s.state[j] == kUnread) continue;
      const double e = exp_sum(logits_of(j, h), csize(j), m);
      s.mass[j] = e;
      read_exact += e;
      read_prior += csize(j) * std::exp((double)s.score[j] - m);
    }

    bool fallback = false;
    if (opt.estimator == Estimator::centroid_prior) {
      // Unread cluster mass ~ alpha * size * exp(q.centroid): the centroid score ranks well
      // but understates a cluster's mass (Jensen); alpha rescales it to the exact reads.
      const double alpha = no_head ? 1.0 : read_exact / read_prior;
      if (!(std::isfinite(alpha) && alpha > 0)) fallback = true;
      for (int64_t j = 0; j < c && !fallback; ++j)
        if (s.state[j] == kUnread) s.mass[j] = alpha * csize(j) * std::exp((double)s.score[j] - m);
    } else {
      // The paper's fit y = a/x + b through the two segments' (mean rank, mean exp-score).
      double y[2];
      for (int sidx = 0; sidx < 2; ++sidx) {
        double e = 0;
        int64_t cnt = 0;
        for (int64_t k = seg[sidx].first; k < seg[sidx].last; ++k) {
          e += s.mass[s.order[k]];
          cnt += csize(s.order[k]);
        }
        y[sidx] = cnt ? e / cnt : 0.0;
      }
      const double x1 = seg[0].x, x2 = seg[1].x;
      double a = (x1 != x2) ? (y[0] - y[1]) / (1.0 / x1 - 1.0 / x2) : 0.0;
      double b = y[0] - a / x1;
      // Degenerate fits fall back to estimates that only raise the tail (more tokens).
      if (!(a >= 0) || !std::isfinite(a)) { a = 0; b = std::max(y[0], y[1]); }
      if (!(b >= 0)) b = 0;
      int64_t r0 = 0;
      for (int64_t k = 0; k < c; ++k) {
        const int64_t j = s.order[k], r1 = r0 + csize(j);
        if (s.state[j] == kUnread)
          s.mass[j] = a * std::log((r1 + 0.5) / (r0 + 0.5)) + b * (double)(r1 - r0);
        r0 = r1;
      }
    }

    int64_t take = 0;
    double acc = a_mass, z = a_mass;
    for (int64_t j = 0; j < c; ++j) z += s.mass[j];
    if (fallback || !(z > 0) || !std::isfinite(z)) {
      std::fill(s.state.begin(), s.state.end(), kChosen);  // read everything
      acc = z = 1;
    } else {
      // Everything already read is attended. Then the stop point: add unread clusters in
      // ranked order until the estimated mass reaches P_eff of the estimated total.
      for (int64_t j = 0; j < c; ++j)
        if (s.state[j] != kUnread) {
          acc += s.mass[j];
          s.state[j] = kChosen;
        }
      s.fresh.clear();
      for (; take < c && acc < p_eff * z; ++take) {
        const int64_t j = rank(take);
        if (s.state[j] != kUnread) continue;
        acc += s.mass[j];
        s.state[j] = kChosen;
        s.fresh.push_back((int32_t)j);
      }
    }
    int64_t sel_tokens = always;
    if (record) own.assign(c, 0);
    for (int64_t j = 0; j < c; ++j)
      if (s.state[j] != kUnread) {
        sel_tokens += csize(j);
        s.mark[j] = 1;
        if (record) own[j] = 1;
      }
    out.head_tokens[h] = sel_tokens;
    out.est_mass[h] = std::min(1.0, acc / z);
    if (record) {
      auto& hr = out.head_rows[h];
      hr.clear();
      push_range(hr, 0, ss.n_sink);
      for (int64_t j = 0; j < c; ++j)
        if (own[j]) push_range(hr, base + off[j], base + off[j + 1]);
      push_range(hr, base + nclu, n);
    }
    if (certified) {  // the second pass resumes this head's scores and ranking
      std::copy(s.score.begin(), s.score.begin() + c, s.head_score.begin() + h * c);
      std::copy(s.order.begin(), s.order.begin() + c, s.head_order.begin() + h * c);
      s.head_sorted[h] = rank.sorted;
    }
  }
  // The certified rule's second pass: every head of the group attends the union of the
  // first reads, so each certifies (and tops up) its mass over that union.
  if (certified) {
    std::vector<float> fixed(always);
    for (int64_t h = 0; h < g; ++h) {
      const float* qh = q + h * d;
      std::copy(s.head_score.begin() + h * c, s.head_score.begin() + (h + 1) * c, s.score.begin());
      std::copy(s.head_order.begin() + h * c, s.head_order.begin() + (h + 1) * c, s.order.begin());
      LazyRank rank(s.order, s.score, c, s.head_sorted[h]);
      // Exp-scores relative to m, the largest of the always-read logits and cluster scores
      // (a reference point only: sums are in double).
      row_logits(st, layer, slot, head, 0, ss.n_sink, qh, fixed.data(), s.row);
      row_logits(st, layer, slot, head, base + nclu, n, qh, fixed.data() + ss.n_sink, s.row);
      double m = -std::numeric_limits<double>::infinity();
      for (float v : fixed) m = std::max(m, (double)v);
      for (int64_t j = 0; j < c; ++j) m = std::max(m, (double)s.score[j]);
      const double a_mass = exp_sum(fixed.data(), (int64_t)fixed.size(), m);
      s.fresh.clear();
      for (int64_t j = 0; j < c; ++j) {
        s.state[j] = s.mark[j] ? kChosen : kUnread;
        if (s.mark[j]) s.fresh.push_back((int32_t)j);
      }
      const CertifiedStop r = certify(st, layer, slot, head, h, qh, opt, z_conf, m, a_mass, rank, 0, logits_of, s);
      int64_t sel_tokens = always;
      for (int64_t j = 0; j < c; ++j)
        if (s.state[j] != kUnread) sel_tokens += csize(j), s.mark[j] = 1;
      out.head_tokens[h] = sel_tokens;
      out.est_mass[h] = r.read + r.tail > 0 ? std::min(1.0, r.read / (r.read + r.tail)) : 1.0;
      if (record) {
        auto& hr = out.head_rows[h];
        hr.clear();
        push_range(hr, 0, ss.n_sink);
        for (int64_t j = 0; j < c; ++j)
          if (s.state[j] != kUnread) push_range(hr, base + off[j], base + off[j + 1]);
        push_range(hr, base + nclu, n);
      }
    }
  }
  out.rows.clear();
  push_range(out.rows, 0, ss.n_sink);
  for (int64_t j = 0; j < c; ++j)
    if (s.mark[j]) push_range(out.rows, base + off[j], base + off[j + 1]);
  push_range(out.rows, base + nclu, n);
}

// The CPU twin of CUDA's threshold selection (cuda/select_threshold.hpp): the prior rule with
// every decision taken in whole score buckets (score_buckets.hpp), each query head on its own.
// Per head: the exact head is the buckets through bh, the first whose token prefix reaches
// head_fraction of the clustered tokens; alpha = the exact mass of those clusters / their
// centroid prior; z = the exact mass of the always-read rows and the exact head + alpha x the
// prior of the rest; the head takes the buckets through bx, the first whose estimated mass
// reaches P_eff z (everything where the estimate degenerates). A crossing bucket is taken
// whole, so it reads as many tokens as the ranked rule's stop or more for the same estimate.
void select_threshold(const KVStore& st, int64_t layer, int64_t slot, int64_t head, const float* q,
                      int64_t g, const SelectOptions& opt, bool record, SelectScratch& s,
                      KVSelection& out) {
  using buckets::kBuckets;
  const ClusterView cv(st, layer, slot, head);
  const SlotState& ss = cv.ss;
  const int64_t c = cv.c, n = cv.n, base = cv.base, nclu = cv.nclu;
  const int32_t* off = cv.off;
  const bool all = c == 0 || c < opt.min_clusters || opt.target >= 1.0;  // as the CUDA twin
  s.mark.assign(std::max<int64_t>(c, 1), all ? 1 : 0);
  out.rows.clear();
  if (all) {
    for (int64_t h = 0; h < g; ++h) {
      out.head_tokens[h] = n;
      out.est_mass[h] = 1.0;
      if (record) out.head_rows[h] = {{0, (int32_t)n}};
    }
    push_range(out.rows, 0, n);
    return;
  }
  const double p_eff = std::min(1.0, opt.target + opt.margin * (1.0 - opt.target));
  const double head_tok = std::max(1.0, opt.head_fraction * (double)nclu);
  s.score.resize(c);
  s.bucket.resize(c);
  s.tok.resize(kBuckets);
  s.pri.resize(kBuckets);
  std::vector<float> fixed(cv.always);
  std::vector<float>& lg = s.logit;  // the exact head's logits (scratch: kept between calls)
  for (int64_t h = 0; h < g; ++h) {
    const float* qh = q + h * cv.d;
    score_clusters(qh, cv.cent, cv.spread, c, cv.d, opt.spread, s.score.data());
    float mx = -std::numeric_limits<float>::infinity(), mn = std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < c; ++j) mx = std::max(mx, s.score[j]), mn = std::min(mn, s.score[j]);
    const float bpl = buckets::bucket_width(mx, mn);
    std::fill(s.tok.begin(), s.tok.end(), 0.0);
    std::fill(s.pri.begin(), s.pri.end(), 0.0);
    for (int64_t j = 0; j < c; ++j) {
      const int b = buckets::bucket_of(s.score[j], mx, bpl);
      s.bucket[j] = b;
      s.tok[b] += (double)cv.size(j);
      s.pri[b] += (double)cv.size(j) * std::exp((double)s.score[j] - (double)mx);
    }
    int bh = kBuckets - 1;
    for (int k = 0, found = 0; k < kBuckets; ++k) {  // inclusive prefixes; bh: the crossing bucket
      if (k > 0) s.tok[k] += s.tok[k - 1], s.pri[k] += s.pri[k - 1];
      if (!found && s.tok[k] >= head_tok) bh = k, found = 1;
    }
    // Exact masses relative to m, the largest logit read: the always-read rows, the exact head.
    row_logits(st, layer, slot, head, 0, ss.n_sink, qh, fixed.data(), s.row);
    row_logits(st, layer, slot, head, base + nclu, n, qh, fixed.data() + ss.n_sink, s.row);
    lg.clear();
    for (int64_t j = 0; j < c; ++j)
      if (s.bucket[j] <= bh) {
        const int64_t at = (int64_t)lg.size();
        lg.resize(at + cv.size(j));
        row_logits(st, layer, slot, head, base + off[j], base + off[j + 1], qh, lg.data() + at, s.row);
      }
    double m = -std::numeric_limits<double>::infinity();
    for (float v : fixed) m = std::max(m, (double)v);
    for (float v : lg) m = std::max(m, (double)v);
    const double am = exp_sum(fixed.data(), (int64_t)fixed.size(), m), ex = exp_sum(lg.data(), (int64_t)lg.size(), m);
    const double prior_head = s.pri[bh], prior_all = s.pri[kBuckets - 1];
    const double alpha = ex / prior_head, z = am + ex + alpha * std::max(0.0, prior_all - prior_head);
    int bx = kBuckets - 1;
    double est = 1.0;
    if (std::isfinite(alpha) && alpha > 0 && std::isfinite(z) && z > 0) {
      const double goal = p_eff * z, acc0 = am + ex;
      int found = -1;
      for (int k = bh; k < kBuckets && found < 0; ++k)
        if (acc0 + alpha * (s.pri[k] - prior_head) >= goal) found = k;
      if (found >= 0) {  // else rounding left the goal unreached: everything
        bx = found;
        est = std::min(1.0, (acc0 + alpha * (s.pri[bx] - prior_head)) / z);
      }
    }
    int64_t tokens = cv.always;
    if (record) {
      out.head_rows[h].clear();
      push_range(out.head_rows[h], 0, ss.n_sink);
    }
    for (int64_t j = 0; j < c; ++j)
      if (s.bucket[j] <= bx) {
        tokens += cv.size(j);
        s.mark[j] = 1;
        if (record) push_range(out.head_rows[h], base + off[j], base + off[j + 1]);
      }
    if (record) push_range(out.head_rows[h], base + nclu, n);
    out.head_tokens[h] = tokens;
    out.est_mass[h] = est;
  }
  push_range(out.rows, 0, ss.n_sink);
  for (int64_t j = 0; j < c; ++j)
    if (s.mark[j]) push_range(out.rows, base + off[j], base + off[j + 1]);
  push_range(out.rows, base + nclu, n);
}

}  // namespace

// Phi^-1(c) for the standard normal, by bisection on erfc (tail_sample.hpp).
double normal_quantile(double c) {
  double lo = -40, hi = 40;
  for (int it = 0; it < 200; ++it) {
    const double mid = 0.5 * (lo + hi);
    (0.5 * std::erfc(-mid / std::sqrt(2.0)) < c ? lo : hi) = mid;
  }
  return 0.5 * (lo + hi);
}

void select_kv_head(const KVStore& store, int64_t layer, int64_t slot, int64_t head,
                    const float* q, int64_t g, const SelectOptions& opt, int64_t budget,
                    bool record_heads, SelectScratch& scratch, KVSelection& out, SelectionKernel selection) {
  const int64_t n = store.length(layer, slot);
  out.head_tokens.assign(g, 0);
  out.est_mass.assign(g, kNaN);
  out.rows.clear();
  if (record_heads) out.head_rows.assign(g, {});
  else out.head_rows.clear();
  if (budget <= 0) budget = opt.budget;
  if (n == 0) {
    out.union_tokens = 0;
    return;
  }
  switch (opt.policy) {
    case Policy::dense:
      push_range(out.rows, 0, n);
      for (int64_t h = 0; h < g; ++h) {
        out.head_tokens[h] = n;
        out.est_mass[h] = 1.0;
        if (record_heads) out.head_rows[h] = out.rows;
      }
      break;
    case Policy::oracle:
    case Policy::topk:
      select_exact(store, layer, slot, head, q, g, opt, budget, record_heads, scratch, out);
      break;
    case Policy::quest:
      select_quest(store, layer, slot, head, q, g, opt, budget, scratch, out);
      if (record_heads)
        for (int64_t h = 0; h < g; ++h) out.head_rows[h] = out.rows;
      break;
    case Policy::tactic:
      if (selection == SelectionKernel::threshold)
        select_threshold(store, layer, slot, head, q, g, opt, record_heads, scratch, out);
      else
        select_tactic(store, layer, slot, head, q, g, opt, record_heads, scratch, out);
      break;
  }
  out.union_tokens = 0;
  for (const RowRange& r : out.rows) out.union_tokens += r.size();
}

}  // namespace tactic
