// The CPU kernels' parallel loops: run_parallel hands out task indices to a
// team of threads.
//
// Default (ORCHARD_CPU_POOL unset or 0): an `omp parallel` team. In a process
// that imported torch it is torch's own OpenMP runtime: torch's wheel ships
// libgomp.so.1 and the loader binds Orchard's libgomp.so.1 to the copy loaded
// first, so Orchard and torch share one team of threads, already spinning
// after torch's last op. Measured (bench/RESULTS.md, cpu_isolation, 2026-12-01,
// 16-core host): the forward right after a torch op took 0.38 / 3.13 / 10.11
// ms (s512 d64 / s2k d128 / s8k d128, bf16) under OpenMP against 1.66 / 4.99 /
// 14.76 with Orchard's own pool, whose 15 extra threads competed with torch's
// spinning ones for the cores.
//
// ORCHARD_CPU_POOL=1: Orchard's own worker pool (opt-in; it was the default for
// two days). The caller starts on the tasks at once, a worker that wakes late
// joins only while tasks are left, and the caller waits only for workers that
// took part; workers spin ORCHARD_CPU_SPIN_US (default 200, read per call)
// after their last task, then sleep. It can pay where nothing else in the
// process runs OpenMP and the calls are far apart; measure before choosing it.
//
// Either way task indices are handed out in increasing order, one at a time,
// exactly like schedule(dynamic, 1), so heaviest-first orderings and every
// determinism argument made for the OpenMP loops still hold: results never
// depend on which thread ran a task.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>

namespace orchard::cpu {

// Hands out task indices 0 .. n-1, each once, to whichever thread asks first.
class TaskQueue {
 public:
  explicit TaskQueue(std::int64_t n) : n_(n) {}
  // The next task, or -1 when none are left.
  std::int64_t next() {
    const std::int64_t t = next_.fetch_add(1, std::memory_order_relaxed);
    return t < n_ ? t : -1;
  }
  bool drained() const { return next_.load(std::memory_order_relaxed) >= n_; }
  std::int64_t size() const { return n_; }

 private:
  std::atomic<std::int64_t> next_{0};
  const std::int64_t n_;
};

// The OpenMP team a run_parallel call asks for (the own pool ignores it). libgomp ends the pool's
// threads past a smaller team's size, and the next larger team (torch's next op, or the call's
// next phase) creates them again: on the 16-core host a forward of b1 h1-h2 s512, whose K / V
// staging had 4-8 tasks and its row blocks 8-16, took 0.24-2.13 ms with fitted teams against
// 0.08-0.40 with whole ones (bench/RESULTS.md [C51]).  The decode kernels measured the other way
// in the same session (b1 GQA 32:4 over 4k keys 1.00 ms whole against 0.47 fitted, unexplained;
// the other decode points within 0.84-1.13x), so they keep fitted teams.
// ORCHARD_CPU_TEAM (read per call, an A/B switch): "fit" or "whole" gives every loop that team,
// unset (or anything else) leaves each loop its own.
enum class Team {
  kFitTasks,  // min(threads, tasks)
  kWhole,     // every thread (those past the tasks find none)
};

namespace detail {
using ParticipantFn = void (*)(void* ctx, int slot, TaskQueue& tasks);
void run_parallel_impl(std::int64_t ntasks, int max_threads, Team team, ParticipantFn fn, void* ctx);
}  // namespace detail

// Region trace for the debug log (ORCHARD_DEBUG_FLASH_ATN=1, core/attention.cpp): between
// region_trace_begin() and region_trace_end() the run_parallel calls this thread makes are timed,
// and region_trace_end() returns them as log fields (regions, then one entry per region: tasks,
// team, wall time, participants' start and busy times, median / max, µs from the region's start).
// Where a call's time goes on many cores: threads that start late (wake-up), busy times that
// differ (load balance), or time outside every region (serial set-up). Off, it costs one
// thread_local read per region.
void region_trace_begin();
std::string region_trace_end();

// Threads the CPU kernels use: OMP_NUM_THREADS / omp_set_num_threads as before
// (omp_get_max_threads), 1 without OpenMP.
int cpu_threads();

// Calls body(slot, tasks) on up to min(cpu_threads(), ntasks) threads (under
// OpenMP with Team::kWhole every thread starts; those past the tasks find none),
// the calling thread included; each call loops `for (t; (t = tasks.next()) >= 0;)`.
// slot < cpu_threads() is unique among this call's participants (index
// per-thread scratch with it). Returns when every task has finished. A call
// made while the pool serves another caller (a second Python thread, or a
// pool thread itself) runs on its calling thread alone.
template <class Body>
void run_parallel(std::int64_t ntasks, Body&& body, Team team = Team::kFitTasks) {
  if (ntasks <= 0) return;
  using B = std::remove_reference_t<Body>;
  auto tramp = [](void* ctx, int slot, TaskQueue& tasks) { (*static_cast<B*>(ctx))(slot, tasks); };
  detail::run_parallel_impl(ntasks, cpu_threads(), team, tramp,
                            const_cast<void*>(static_cast<const void*>(std::addressof(body))));
}

// Tasks 0 .. groups * per_group - 1 in `groups` runs of per_group (task t is in group t / per_group),
// for consecutive regions over the same data (the forward's K / V staging, then its row blocks):
// a participant takes its home group's tasks first, then what is left of the next groups in turn.
// The home of a slot is the same in every region (groups spread evenly over cpu_threads() slots), so
// the threads that staged a (batch, kv head)'s K / V mostly run its row blocks too. With one shared
// queue any thread read lines any other had written, and on the 16-core host rewriting those lines
// in the next call's staging (held shared in up to 16 cores' caches) took 6-10x the time of the
// same staging back to back (bench/RESULTS.md [G60]). Every task still runs exactly once, whichever
// threads take part (a late or missing one's home group is drained by the others).
class GroupedTasks {
 public:
  GroupedTasks(std::int64_t groups, std::int64_t per_group, int slots = cpu_threads())
      : groups_(std::max<std::int64_t>(groups, 0)), per_(std::max<std::int64_t>(per_group, 0)),
        slots_(std::max(slots, 1)), counters_(new Counter[static_cast<std::size_t>(std::max<std::int64_t>(groups_, 1))]) {}
  std::int64_t size() const { return groups_ * per_; }
  // The next task for the participant at `slot`, -1 when none are left. `visited` (0 at the
  // participant's start) counts the groups it has drained.
  std::int64_t next(int slot, std::int64_t& visited) {
    const std::int64_t home = std::int64_t(slot % slots_) * groups_ / slots_;
    for (; visited < groups_; ++visited) {
      const std::int64_t q = (home + visited) % groups_;
      const std::int64_t i = counters_[q].next.fetch_add(1, std::memory_order_relaxed);
      if (i < per_) return q * per_ + i;
    }
    return -1;
  }
  // Hands out nothing more (a participant's error: the others stop early, as with a TaskQueue).
  void cancel() {
    for (std::int64_t q = 0; q < groups_; ++q) counters_[q].next.store(per_, std::memory_order_relaxed);
  }

 private:
  struct alignas(64) Counter {  // one cache line each: the groups' threads do not share a line
    std::atomic<std::int64_t> next{0};
  };
  std::int64_t groups_, per_;
  int slots_;
  std::unique_ptr<Counter[]> counters_;
};

// run_parallel over GroupedTasks(groups, per_group): body(next) once per participant, next() its
// next task or -1, the loop a TaskQueue body writes; an error stops the handing out, as there.
// (run_parallel's own queue goes unused: a late pool worker joins, finds nothing and leaves.)
template <class Body>
void run_grouped(std::int64_t groups, std::int64_t per_group, Body&& body, Team team = Team::kFitTasks) {
  GroupedTasks tasks(groups, per_group);
  run_parallel(tasks.size(), [&](int slot, TaskQueue&) {
    std::int64_t visited = 0;
    try {
      body([&] { return tasks.next(slot, visited); });
    } catch (...) {
      tasks.cancel();
      throw;
    }
  }, team);
}

}  // namespace orchard::cpu
