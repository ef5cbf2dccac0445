// The worker pool behind run_parallel (task_pool.h says why it exists).
#include "backends/cpu/task_pool.h"

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include <pthread.h>

#ifdef ORCHARD_WITH_OPENMP
#include <omp.h>
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace orchard::cpu {
namespace {

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

long env_long(const char* name, long fallback) {
  const char* e = std::getenv(name);
  if (!e || !*e) return fallback;
  char* end = nullptr;
  const long v = std::strtol(e, &end, 10);
  return (end && *end == '\0' && v >= 0) ? v : fallback;
}

// One run_parallel call; lives on the caller's stack until every participant left.
struct Job {
  detail::ParticipantFn fn;
  void* ctx;
  TaskQueue* tasks;
  int nslots;                  // participants wanted (the caller is slot 0)
  std::atomic<int> active{0};  // workers inside fn
  std::exception_ptr error;    // the first exception a worker threw (under the pool's mutex)
};

thread_local bool t_pool_thread = false;

// How long an idle worker spins before it sleeps (ORCHARD_CPU_SPIN_US): long
// enough to bridge the jobs of one call and the autograd step between a
// forward and its backward, short against libgomp's default (300k pause
// loops: milliseconds), so the workers do not spin through torch's next op.
constexpr long kDefaultSpinUs = 200;

class Pool {
 public:

  // Claims the pool for one caller; false while another caller holds it.
  bool try_acquire() { return !busy_.exchange(true, std::memory_order_acquire); }
  void release() { busy_.store(false, std::memory_order_release); }

  // Runs job with the caller as slot 0; the caller holds the pool.
  void run(Job& job) {
    // Read per call (~50 ns), so a benchmark can A/B it in one process.
    spin_us_.store(env_long("ORCHARD_CPU_SPIN_US", kDefaultSpinUs), std::memory_order_relaxed);
    ensure_workers(job.nslots - 1);
    bool wake = false;
    {
      std::lock_guard<std::mutex> lk(mu_);
      job_ = &job;
      gen_.fetch_add(1, std::memory_order_release);
      wake = sleepers_ > 0;
    }
    if (wake) cv_.notify_all();
    std::exception_ptr mine;
    try {
      job.fn(job.ctx, 0, *job.tasks);
    } catch (...) {
      mine = std::current_exception();
      while (job.tasks->next() >= 0) {}  // let the workers stop early
    }
    {
      std::lock_guard<std::mutex> lk(mu_);
      job_ = nullptr;  // from here no worker can join this job
    }
    // The ones that joined are inside a task (or leaving): a short wait.
    for (int i = 0; job.active.load(std::memory_order_acquire) != 0; ++i) {
      if (i < 1024) cpu_relax(); else std::this_thread::yield();
    }
    if (mine) std::rethrow_exception(mine);
    if (job.error) std::rethrow_exception(job.error);
  }

 private:
  void ensure_workers(int n) {
    for (; nworkers_ < n; ++nworkers_) {
      const int slot = nworkers_ + 1;
      const std::uint64_t seen = gen_.load(std::memory_order_relaxed);
      std::thread([this, slot, seen] { worker(slot, seen); }).detach();
    }
  }

  void worker(int slot, std::uint64_t seen) {
    t_pool_thread = true;
    for (;;) {
      // Spin briefly for the next job, then sleep until one is published.
      const auto t0 = std::chrono::steady_clock::now();
      const auto spin = std::chrono::microseconds(spin_us_.load(std::memory_order_relaxed));
      for (int i = 1; gen_.load(std::memory_order_acquire) == seen; ++i) {
        cpu_relax();
        if (i % 64 == 0 && std::chrono::steady_clock::now() - t0 > spin) {
          std::unique_lock<std::mutex> lk(mu_);
          ++sleepers_;
          cv_.wait(lk, [&] { return gen_.load(std::memory_order_relaxed) != seen; });
          --sleepers_;
          break;
        }
      }
      Job* job = nullptr;
      {
        std::lock_guard<std::mutex> lk(mu_);
        seen = gen_.load(std::memory_order_relaxed);
        job = job_;
        if (job && (slot >= job->nslots || job->tasks->drained())) job = nullptr;
        if (job) job->active.fetch_add(1, std::memory_order_relaxed);
      }
      if (!job) continue;
      try {
        job->fn(job->ctx, slot, *job->tasks);
      } catch (...) {
        std::lock_guard<std::mutex> lk(mu_);
        if (!job->error) job->error = std::current_exception();
        while (job->tasks->next() >= 0) {}
      }
      job->active.fetch_sub(1, std::memory_order_release);
    }
  }

  // gen_ on its own cache line: spinning workers poll it, the mutex's line is written.
  alignas(64) std::atomic<std::uint64_t> gen_{0};  // bumped under mu_ per job
  alignas(64) std::mutex mu_;
  std::condition_variable cv_;
  Job* job_ = nullptr;  // the job open for joining (under mu_)
  int sleepers_ = 0;    // under mu_
  int nworkers_ = 0;    // touched by the pool's holder only
  std::atomic<bool> busy_{false};
  std::atomic<long> spin_us_{kDefaultSpinUs};
};

// Leaked on purpose: detached workers may still sleep on it at exit. A forked
// child has none of the parent's workers (and maybe a held mutex): it starts
// a new pool. No lock on this path, so a fork cannot leave one held here.
std::atomic<Pool*> g_pool{nullptr};
std::once_flag g_atfork_once;

Pool& pool() {
  std::call_once(g_atfork_once, [] {
    pthread_atfork(nullptr, nullptr, [] { g_pool.store(nullptr, std::memory_order_relaxed); });
  });
  Pool* p = g_pool.load(std::memory_order_acquire);
  if (!p) {
    Pool* fresh = new Pool();  // no workers until its first job: safe to drop
    if (g_pool.compare_exchange_strong(p, fresh, std::memory_order_acq_rel))
      p = fresh;
    else
      delete fresh;
  }
  return *p;
}

// ORCHARD_CPU_TEAM=fit / whole over a loop's own Team (task_pool.h).
Team team_override(Team own) {
  const char* e = std::getenv("ORCHARD_CPU_TEAM");
  if (e && std::strcmp(e, "fit") == 0) return Team::kFitTasks;
  if (e && std::strcmp(e, "whole") == 0) return Team::kWhole;
  return own;
}

bool pool_enabled() { return env_long("ORCHARD_CPU_POOL", 0) != 0; }  // opt-in: task_pool.h

// One traced region (region_trace_begin): µs from its start at which each slot entered and left.
using TraceClock = std::chrono::steady_clock;
struct RegionRecord {
  std::int64_t tasks = 0;
  int team = 0;
  TraceClock::time_point t0;
  double wall_us = 0;
  std::vector<double> enter_us, leave_us;  // per slot; -1: the slot never entered
};

struct RegionTrace {
  TraceClock::time_point t0;
  std::vector<RegionRecord> regions;
};

thread_local std::unique_ptr<RegionTrace> t_trace;  // the calling thread's open trace
thread_local bool t_in_traced_region = false;  // a region nested in a traced one is not recorded

double us_since(TraceClock::time_point t0) {
  return std::chrono::duration<double, std::micro>(TraceClock::now() - t0).count();
}

// The participant wrapper of a traced region: times the slot's part.
struct TracedCall {
  detail::ParticipantFn fn;
  void* ctx;
  RegionRecord* rec;
};

void traced_participant(void* c, int slot, TaskQueue& tasks) {
  auto* t = static_cast<TracedCall*>(c);
  const double enter = us_since(t->rec->t0);
  t->fn(t->ctx, slot, tasks);
  t->rec->enter_us[slot] = enter;  // each slot is written by its own thread only
  t->rec->leave_us[slot] = us_since(t->rec->t0);
}

// "median/max" of xs (not empty), in whole µs.
std::string median_max(std::vector<double> xs) {
  std::sort(xs.begin(), xs.end());
  char buf[48];
  std::snprintf(buf, sizeof buf, "%.0f/%.0f", xs[xs.size() / 2], xs.back());
  return buf;
}

}  // namespace

void region_trace_begin() { t_trace = std::make_unique<RegionTrace>(RegionTrace{TraceClock::now(), {}}); }

std::string region_trace_end() {
  const std::unique_ptr<RegionTrace> tr = std::move(t_trace);
  if (!tr) return {};
  double in_regions = 0;
  std::string regions;
  for (const RegionRecord& r : tr->regions) {
    std::vector<double> start, busy;
    for (std::size_t i = 0; i < r.enter_us.size(); ++i)
      if (r.enter_us[i] >= 0) start.push_back(r.enter_us[i]), busy.push_back(r.leave_us[i] - r.enter_us[i]);
    char head[96];
    std::snprintf(head, sizeof head, " [tasks=%lld team=%d wall_us=%.0f", static_cast<long long>(r.tasks), r.team,
                  r.wall_us);
    regions += head;
    if (!start.empty()) regions += " start_us=" + median_max(start) + " busy_us=" + median_max(busy);
    regions += "]";
    in_regions += r.wall_us;
  }
  char total[96];
  std::snprintf(total, sizeof total, "cpu_regions=%zu cpu_region_us=%.0f cpu_outside_us=%.0f", tr->regions.size(),
                in_regions, std::max(0.0, us_since(tr->t0) - in_regions));
  return total + regions;
}

int cpu_threads() {
#ifdef ORCHARD_WITH_OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

namespace detail {
namespace {

// run_parallel_impl's region; returns the threads it started, the caller included.
int run_region(std::int64_t ntasks, int max_threads, Team team_kind, ParticipantFn fn, void* ctx) {
  TaskQueue tasks(ntasks);
  const int nslots = static_cast<int>(std::min<std::int64_t>(std::max(max_threads, 1), ntasks));
  if (nslots <= 1 || t_pool_thread) {
    fn(ctx, 0, tasks);
    return 1;
  }
  if (!pool_enabled()) {
#ifdef ORCHARD_WITH_OPENMP
    // Team (task_pool.h): the whole team or one fitted to the tasks.
    const bool whole = team_override(team_kind) == Team::kWhole;
    const int team = whole ? std::max(max_threads, 1) : nslots;
    std::exception_ptr error;
#pragma omp parallel num_threads(team)
    {
      try {
        fn(ctx, omp_get_thread_num(), tasks);
      } catch (...) {
#pragma omp critical(orchard_task_pool_error)
        if (!error) error = std::current_exception();
        while (tasks.next() >= 0) {}
      }
    }
    if (error) std::rethrow_exception(error);
    return team;
#else
    fn(ctx, 0, tasks);
    return 1;
#endif
  }
  Pool& p = pool();
  if (!p.try_acquire()) {  // another caller holds the pool
    fn(ctx, 0, tasks);
    return 1;
  }
  Job job{fn, ctx, &tasks, nslots, {}, {}};
  try {
    p.run(job);
  } catch (...) {
    p.release();
    throw;
  }
  p.release();
  return nslots;
}

}  // namespace

void run_parallel_impl(std::int64_t ntasks, int max_threads, Team team_kind, ParticipantFn fn, void* ctx) {
  if (!t_trace || t_in_traced_region) {
    run_region(ntasks, max_threads, team_kind, fn, ctx);
    return;
  }
  RegionRecord& rec = t_trace->regions.emplace_back();
  rec.tasks = ntasks;
  const std::size_t slots = static_cast<std::size_t>(std::max(max_threads, 1));
  rec.enter_us.assign(slots, -1.0);
  rec.leave_us.assign(slots, -1.0);
  TracedCall traced{fn, ctx, &rec};
  t_in_traced_region = true;
  rec.t0 = TraceClock::now();
  try {
    rec.team = run_region(ntasks, max_threads, team_kind, &traced_participant, &traced);
  } catch (...) {
    t_in_traced_region = false;
    throw;
  }
  rec.wall_us = us_since(rec.t0);
  t_in_traced_region = false;
}

}  // namespace detail
}  // namespace orchard::cpu
