#include "emulator_runtime.h"

#include <condition_variable>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace orchard::metal_emu {
namespace {

// Thrown in a GPU thread to unwind it once the group has failed.
struct Abort {};

constexpr unsigned kEndOfKernel = 0;  // the "site" of returning from the kernel

struct GroupState {
  std::mutex mu;
  std::condition_variable cv;
  std::uint32_t size = 0;
  std::uint32_t arrived = 0;
  std::uint64_t generation = 0;
  unsigned site = 0;  // barrier line of the first arrival of this generation
  bool failed = false;
  std::string error;
  std::vector<std::uint64_t> collective_hash;  // per GPU thread, cumulative

  // Caller holds mu.
  [[noreturn]] void fail_locked(std::string why) {
    if (!failed) {
      failed = true;
      error = std::move(why);
    }
    cv.notify_all();
    throw Abort{};
  }
};

struct ThreadContext {
  GroupState* group = nullptr;
  std::uint32_t thread = 0;
  std::uint32_t group_index = 0;
};
thread_local ThreadContext tls;

std::string site_name(unsigned line) {
  return line == kEndOfKernel ? std::string("the end of the kernel") : "threadgroup_barrier at line " + std::to_string(line);
}

void arrive(unsigned line) {
  GroupState& g = *tls.group;
  std::unique_lock lock(g.mu);
  if (g.failed) throw Abort{};
  if (g.arrived == 0) {
    g.site = line;
  } else if (g.site != line) {
    g.fail_locked("threadgroup " + std::to_string(tls.group_index) + ": barrier divergence: thread " +
                  std::to_string(tls.thread) + " reached " + site_name(line) + " while others wait at " +
                  site_name(g.site));
  }
  if (++g.arrived < g.size) {
    const std::uint64_t gen = g.generation;
    g.cv.wait(lock, [&] { return g.failed || g.generation != gen; });
    if (g.failed) throw Abort{};
    return;
  }
  // Last arrival: every simdgroup's lanes must have issued the same collectives.
  for (std::uint32_t t = 0; t < g.size; ++t) {
    const std::uint32_t first = t - t % kSimdWidth;
    if (g.collective_hash[t] != g.collective_hash[first])
      g.fail_locked("threadgroup " + std::to_string(tls.group_index) + ": simdgroup " +
                    std::to_string(t / kSimdWidth) + ": lane " + std::to_string(t % kSimdWidth) +
                    " issued different simdgroup_matrix operations/arguments than lane 0 before " +
                    site_name(line));
  }
  g.arrived = 0;
  ++g.generation;
  g.cv.notify_all();
}

}  // namespace

void barrier(unsigned source_line) {
  require(tls.group != nullptr, "threadgroup_barrier called outside an emulated kernel");
  arrive(source_line == kEndOfKernel ? 1u << 30 : source_line);
}

void note_collective(int op, const void* pointer, std::uint64_t stride, bool transpose) {
  if (tls.group == nullptr) return;
  std::uint64_t& h = tls.group->collective_hash[tls.thread];  // only this thread writes its slot
  const std::uint64_t words[4] = {static_cast<std::uint64_t>(op), reinterpret_cast<std::uintptr_t>(pointer), stride,
                                  static_cast<std::uint64_t>(transpose)};
  for (std::uint64_t w : words) h = (h ^ w) * 0x100000001b3ull;
}

void require(bool ok, const char* what) {
  if (ok) return;
  if (tls.group == nullptr) throw EmulationError(what);
  std::unique_lock lock(tls.group->mu);
  tls.group->fail_locked(what);
}

void run_grid(std::uint32_t groups, std::uint32_t threads_per_group,
              const std::function<void(const ThreadIds&)>& body) {
  if (threads_per_group == 0 || threads_per_group % kSimdWidth != 0)
    throw EmulationError("threads per threadgroup must be a positive multiple of 32, got " +
                         std::to_string(threads_per_group));
  if (groups == 0) return;
  GroupState g;
  g.size = threads_per_group;
  g.collective_hash.assign(threads_per_group, 0);
  std::vector<std::thread> workers;
  workers.reserve(threads_per_group);
  for (std::uint32_t t = 0; t < threads_per_group; ++t) {
    workers.emplace_back([&g, &body, t, groups] {
      tls = ThreadContext{&g, t, 0};
      try {
        for (std::uint32_t group = 0; group < groups; ++group) {
          tls.group_index = group;
          body(ThreadIds{group, t, t / kSimdWidth, t % kSimdWidth});
          arrive(kEndOfKernel);  // nobody starts the next group until all left this one
        }
      } catch (const Abort&) {
      } catch (const std::exception& e) {
        std::unique_lock lock(g.mu);
        try {
          g.fail_locked(std::string("exception in GPU thread: ") + e.what());
        } catch (const Abort&) {
        }
      }
      tls = ThreadContext{};
    });
  }
  for (auto& w : workers) w.join();
  if (g.failed) throw EmulationError("metal emulator: " + g.error);
}

}  // namespace orchard::metal_emu
