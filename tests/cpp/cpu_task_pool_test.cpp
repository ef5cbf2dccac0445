// The CPU kernels' worker pool (backends/cpu/task_pool.h): every task runs
// exactly once, slots are private to one thread per call, exceptions reach
// the caller, and a second caller, a nested call, the OpenMP default
// (ORCHARD_CPU_POOL unset or 0) and a forked child all still finish every task.
// The fixture turns the pool on (ORCHARD_CPU_POOL=1): it is opt-in.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <string>
#include <cstdlib>
#include <mutex>
#include <set>
#include <stdexcept>
#include <thread>
#include <utility>
#include <vector>

#include <sys/wait.h>
#include <unistd.h>

#ifdef ORCHARD_WITH_OPENMP
#include <omp.h>
#endif

#include "backends/cpu/task_pool.h"

namespace orchard::test {
namespace {

using cpu::run_parallel;
using cpu::TaskQueue;

// Runs n tasks; true when each ran once and no slot was shared by two threads.
bool run_and_check(std::int64_t n, cpu::Team team = cpu::Team::kFitTasks) {
  std::vector<std::atomic<int>> hits(static_cast<std::size_t>(n));
  std::mutex mu;
  std::vector<std::set<std::thread::id>> slot_threads(256);
  bool slot_ok = true;
  const int nslots = cpu::cpu_threads();  // the caller's thread count (a worker's ICV differs)
  run_parallel(n, [&](int slot, TaskQueue& tasks) {
    {
      std::lock_guard<std::mutex> lk(mu);
      if (slot < 0 || slot >= nslots || slot >= 256) slot_ok = false;
      else slot_threads[slot].insert(std::this_thread::get_id());
    }
    for (std::int64_t t; (t = tasks.next()) >= 0;) hits[t].fetch_add(1);
  }, team);
  for (auto& s : slot_threads) slot_ok = slot_ok && s.size() <= 1;
  for (auto& h : hits)
    if (h.load() != 1) return false;
  return slot_ok;
}

class TaskPool : public ::testing::Test {
 protected:
  void SetUp() override {
    setenv("ORCHARD_CPU_POOL", "1", 1);
#ifdef ORCHARD_WITH_OPENMP
    saved_ = omp_get_max_threads();
    omp_set_num_threads(4);  // more slots than this 2-core box has cores
#endif
  }
  void TearDown() override {
    unsetenv("ORCHARD_CPU_POOL");
#ifdef ORCHARD_WITH_OPENMP
    omp_set_num_threads(saved_);
#endif
  }
  int saved_ = 1;
};

TEST_F(TaskPool, EveryTaskOnceSlotsPrivate) {
  for (std::int64_t n : {1, 2, 3, 7, 64, 1000})
    for (int rep = 0; rep < 20; ++rep) ASSERT_TRUE(run_and_check(n)) << "n=" << n;
}

TEST_F(TaskPool, SleptWorkersWakeUp) {
  ASSERT_TRUE(run_and_check(100));
  std::this_thread::sleep_for(std::chrono::milliseconds(20));  // past the spin: workers sleep
  ASSERT_TRUE(run_and_check(100));
}

TEST_F(TaskPool, ExceptionReachesCaller) {
  for (std::int64_t bad : {0, 5, 99}) {
    EXPECT_THROW(run_parallel(100,
                              [&](int, TaskQueue& tasks) {
                                for (std::int64_t t; (t = tasks.next()) >= 0;) {
                                  if (t == bad) throw std::runtime_error("task failed");
                                  std::this_thread::sleep_for(std::chrono::microseconds(50));
                                }
                              }),
                 std::runtime_error);
    EXPECT_TRUE(run_and_check(200));  // the pool is usable afterwards
  }
}

TEST_F(TaskPool, ConcurrentCallersAndNestedCalls) {
  std::atomic<bool> ok{true};
  auto caller = [&] {
    for (int rep = 0; rep < 50; ++rep)
      if (!run_and_check(97)) ok = false;
  };
  std::thread a(caller), b(caller);
  a.join();
  b.join();
  EXPECT_TRUE(ok.load());
  std::atomic<int> inner{0};
  run_parallel(8, [&](int, TaskQueue& tasks) {
    for (std::int64_t t; (t = tasks.next()) >= 0;)
      run_parallel(10, [&](int, TaskQueue& in) {
        for (std::int64_t u; (u = in.next()) >= 0;) inner.fetch_add(1);
      });
  });
  EXPECT_EQ(inner.load(), 80);
}

TEST_F(TaskPool, OpenMPDefault) {
  unsetenv("ORCHARD_CPU_POOL");  // the default: OpenMP
  EXPECT_TRUE(run_and_check(500));
  setenv("ORCHARD_CPU_POOL", "0", 1);
  EXPECT_TRUE(run_and_check(500));
}

// Team::kWhole starts every OpenMP thread, however few the tasks, Team::kFitTasks min(threads,
// tasks), and ORCHARD_CPU_TEAM=fit / whole overrides either; each task still runs once, inside
// another parallel region too.
TEST_F(TaskPool, OpenMPWholeTeam) {
  unsetenv("ORCHARD_CPU_POOL");
  for (const char* over : {"", "fit", "whole"})
    for (cpu::Team own : {cpu::Team::kWhole, cpu::Team::kFitTasks}) {
      setenv("ORCHARD_CPU_TEAM", over, 1);
      for (std::int64_t n : {2, 3, 5, 100})
        for (int rep = 0; rep < 10; ++rep) ASSERT_TRUE(run_and_check(n, own)) << n << " '" << over << "'";
#ifdef ORCHARD_WITH_OPENMP
      std::atomic<int> threads{0};
      run_parallel(2, [&](int, TaskQueue& tasks) {
        threads.fetch_add(1);
        while (tasks.next() >= 0) {}
      }, own);
      const bool whole = over[0] ? over[0] == 'w' : own == cpu::Team::kWhole;
      EXPECT_EQ(threads.load(), whole ? omp_get_max_threads() : 2) << "'" << over << "'";
#endif
    }
  unsetenv("ORCHARD_CPU_TEAM");
#ifdef ORCHARD_WITH_OPENMP
  std::atomic<bool> nested_ok{true};
#pragma omp parallel num_threads(2)
  {
    if (!run_and_check(7, cpu::Team::kWhole)) nested_ok = false;
  }
  EXPECT_TRUE(nested_ok.load());
#endif
}

// The debug log's region trace (region_trace_begin / _end): one entry per region the calling
// thread started, in order, with its tasks, team and times; a region nested in a traced one and
// regions after the end are not recorded. Both the pool and OpenMP (the default).
TEST_F(TaskPool, RegionTraceRecordsEachRegion) {
  for (const char* pool : {"1", "0"}) {
    setenv("ORCHARD_CPU_POOL", pool, 1);
    cpu::region_trace_begin();
    run_parallel(8, [&](int, TaskQueue& tasks) {
      for (std::int64_t t; (t = tasks.next()) >= 0;) {
        run_parallel(4, [](int, TaskQueue& inner) { while (inner.next() >= 0) {} });  // nested: not recorded
        std::this_thread::sleep_for(std::chrono::milliseconds(2));
      }
    });
    run_parallel(1, [](int, TaskQueue& tasks) { while (tasks.next() >= 0) {} });
    const std::string trace = cpu::region_trace_end();
    EXPECT_EQ(trace.rfind("cpu_regions=2 ", 0), 0u) << trace;
    const std::size_t first = trace.find("[tasks=8 team="), second = trace.find("[tasks=1 team=1 ");
    ASSERT_NE(first, std::string::npos) << trace;
    ASSERT_NE(second, std::string::npos) << trace;
    EXPECT_LT(first, second) << trace;
    // Region 1: 8 tasks of >= 2 ms over at most 4 threads, so some thread was busy >= 4 ms.
    const std::size_t busy = trace.find("busy_us=", first);
    ASSERT_LT(busy, second) << trace;
    const std::size_t slash = trace.find('/', busy);
    EXPECT_GE(std::stod(trace.substr(slash + 1)), 4000.0) << trace;
    EXPECT_GE(std::stod(trace.substr(trace.find("wall_us=", first) + 8)), 4000.0) << trace;
    run_parallel(3, [](int, TaskQueue& tasks) { while (tasks.next() >= 0) {} });
    EXPECT_EQ(cpu::region_trace_end(), "") << "a region after the end was recorded";
  }
}

// GroupedTasks: every task exactly once whichever slots take part (all, some, one; more slots
// than groups or fewer, in turn or at once); slot s of n starts in group s * groups / n.
TEST_F(TaskPool, GroupedTasksEveryTaskOnceHomeFirst) {
  for (std::int64_t groups : {1, 3, 8, 20})
    for (std::int64_t per : {1, 5})
      for (int slots : {1, 4, 16})
        for (int present : {1, 2, slots}) {
          if (present > slots) continue;
          cpu::GroupedTasks tasks(groups, per, slots);
          ASSERT_EQ(tasks.size(), groups * per);
          std::vector<int> hits(static_cast<std::size_t>(groups * per), 0);
          for (int slot = 0; slot < present; ++slot) {  // one participant after another
            std::int64_t visited = 0;
            const std::int64_t first = tasks.next(slot, visited);
            if (first < 0) continue;  // (the first participant drains every group)
            if (slot == 0) EXPECT_EQ(first, 0);
            ++hits[first];
            for (std::int64_t t; (t = tasks.next(slot, visited)) >= 0;) ++hits[t];
          }
          for (int h : hits) ASSERT_EQ(h, 1) << groups << " " << per << " " << slots << " " << present;
        }
  for (auto [groups, per] : {std::pair<std::int64_t, std::int64_t>{0, 5}, {3, 0}}) {  // no tasks at all
    cpu::GroupedTasks none(groups, per, 4);
    std::int64_t seen = 0;
    EXPECT_EQ(none.size(), 0);
    EXPECT_EQ(none.next(1, seen), -1);
  }
  // Homes: 16 slots over 8 groups, two slots each; 2 slots over 8 groups, groups 0 and 4.
  cpu::GroupedTasks wide(8, 2, 16), narrow(8, 2, 2);
  std::int64_t visited = 0;
  EXPECT_EQ(wide.next(5, visited) / 2, 2);
  visited = 0;
  EXPECT_EQ(narrow.next(1, visited) / 2, 4);
  // Concurrent participants (run_grouped), each task once, with either team; an error reaches the
  // caller and stops the handing out: far fewer than all 400 tasks start.
  for (const char* pool : {"1", "0"})
    for (cpu::Team team : {cpu::Team::kWhole, cpu::Team::kFitTasks}) {
      setenv("ORCHARD_CPU_POOL", pool, 1);
      std::vector<std::atomic<int>> hits(35);
      cpu::run_grouped(5, 7, [&](auto next) {
        for (std::int64_t t; (t = next()) >= 0;) hits[t].fetch_add(1);
      }, team);
      for (auto& h : hits) ASSERT_EQ(h.load(), 1) << pool;
      std::atomic<int> started{0};
      EXPECT_THROW(cpu::run_grouped(4, 100, [&](auto next) {
        for (std::int64_t t; (t = next()) >= 0;) {
          started.fetch_add(1);
          if (t == 0) throw std::runtime_error("task 0");
          std::this_thread::sleep_for(std::chrono::milliseconds(1));
        }
      }, team), std::runtime_error) << pool;
      EXPECT_LT(started.load(), 100) << pool;
    }
}

TEST_F(TaskPool, ForkedChildFinishes) {
  ASSERT_TRUE(run_and_check(64));  // the parent has workers
  const pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) _exit(run_and_check(64) && run_and_check(1000) ? 0 : 1);
  int status = 0;
  ASSERT_EQ(waitpid(pid, &status, 0), pid);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
}

}  // namespace
}  // namespace orchard::test
