// Orchard's own worker pool for the CPU kernels' parallel loops.
//
// Why not `omp parallel` + `omp for schedule(dynamic, 1)` (the previous code):
// a team's join waits for EVERY thread of the team, including one the OS has
// not woken yet. Orchard's calls usually follow torch's (its own OpenMP pool,
// busy or spinning on every core), so some of Orchard's sleeping threads wake
// late and a small call (b1 h8 s512: ~0.4 ms of work on 16 cores) measured
// ~1 ms instead of 0.37 (bench/RESULTS.md, cpu_isolation). Here the caller
// starts on the tasks at once, a worker that wakes late joins only while
// tasks are left, and the caller waits only for workers that took part.
// Workers spin ORCHARD_CPU_SPIN_US (default 200, read per call) after their
// last task, so the jobs of one call and a backward right after its forward
// need no wake-up, then sleep: they do not spin through the caller's next
// torch op (libgomp's default spin lasts milliseconds).
//
// ORCHARD_CPU_POOL=0 runs the same participant function under `omp parallel`
// (the A/B switch). Task indices are handed out in increasing order, one at
// a time, exactly like schedule(dynamic, 1), so heaviest-first orderings and
// every determinism argument made for the OpenMP loops still hold: results
// never depend on which thread ran a task.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
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

namespace detail {
using ParticipantFn = void (*)(void* ctx, int slot, TaskQueue& tasks);
void run_parallel_impl(std::int64_t ntasks, int max_threads, ParticipantFn fn, void* ctx);
}  // namespace detail

// Threads the CPU kernels use: OMP_NUM_THREADS / omp_set_num_threads as before
// (omp_get_max_threads), 1 without OpenMP.
int cpu_threads();

// Calls body(slot, tasks) on up to min(cpu_threads(), ntasks) threads, the
// calling thread included; each call loops `for (t; (t = tasks.next()) >= 0;)`.
// slot < cpu_threads() is unique among this call's participants (index
// per-thread scratch with it). Returns when every task has finished. A call
// made while the pool serves another caller (a second Python thread, or a
// pool thread itself) runs on its calling thread alone.
template <class Body>
void run_parallel(std::int64_t ntasks, Body&& body) {
  if (ntasks <= 0) return;
  using B = std::remove_reference_t<Body>;
  auto tramp = [](void* ctx, int slot, TaskQueue& tasks) { (*static_cast<B*>(ctx))(slot, tasks); };
  detail::run_parallel_impl(ntasks, cpu_threads(), tramp,
                            const_cast<void*>(static_cast<const void*>(std::addressof(body))));
}

}  // namespace orchard::cpu
