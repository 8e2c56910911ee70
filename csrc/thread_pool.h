// A persistent pool: parallel_for(n, fn) runs fn(i) for i in [0, n) on the pool's workers plus the
// calling thread, handing out indices dynamically, and returns when all are done.
#pragma once

#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace bmclip {

class ThreadPool {
 public:
  // `num_threads` counts the caller: 1 means the caller does all the work.
  explicit ThreadPool(int num_threads) : num_threads_(num_threads < 1 ? 1 : num_threads) { start(); }

  ~ThreadPool() {
    if (getpid() != state_->pid) {
      // A forked child never had the parent's workers; their thread handles must not be joined.
      (void)state_.release();
      return;
    }
    stop_workers();
  }

  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int num_threads() const { return num_threads_; }

  // fn must not throw (callers catch per item).
  void parallel_for(size_t n, const std::function<void(size_t)>& fn) {
    std::lock_guard<std::mutex> run_lock(run_m_);  // one batch at a time per pool
    if (getpid() != state_->pid) {
      // After fork() only the forking thread exists in the child: abandon the copied state (its
      // threads are gone and its mutexes may be held) and start fresh workers.
      (void)state_.release();
      start();
    }
    if (n == 0) return;
    State& s = *state_;
    if (s.workers.empty() || n == 1) {
      for (size_t i = 0; i < n; ++i) fn(i);
      return;
    }
    {
      std::lock_guard<std::mutex> lk(s.m);
      s.fn = &fn;
      s.n = n;
      s.next.store(0);
      s.busy = s.workers.size();
      ++s.generation;
    }
    s.cv_start.notify_all();
    drain(s);
    std::unique_lock<std::mutex> lk(s.m);
    s.cv_done.wait(lk, [&s] { return s.busy == 0; });
    s.fn = nullptr;
  }

 private:
  struct State {
    pid_t pid;
    std::vector<std::thread> workers;
    std::mutex m;
    std::condition_variable cv_start, cv_done;
    const std::function<void(size_t)>* fn = nullptr;
    size_t n = 0;
    std::atomic<size_t> next{0};
    size_t busy = 0;
    uint64_t generation = 0;
    bool stop = false;
  };

  void start() {
    state_ = std::make_unique<State>();
    state_->pid = getpid();
    State* s = state_.get();
    for (int t = 1; t < num_threads_; ++t) s->workers.emplace_back([s] { worker_loop(s); });
  }

  void stop_workers() {
    {
      std::lock_guard<std::mutex> lk(state_->m);
      state_->stop = true;
    }
    state_->cv_start.notify_all();
    for (auto& w : state_->workers) w.join();
  }

  static void drain(State& s) {
    const std::function<void(size_t)>& fn = *s.fn;
    for (size_t i = s.next.fetch_add(1); i < s.n; i = s.next.fetch_add(1)) fn(i);
  }

  static void worker_loop(State* s) {
    uint64_t seen = 0;
    while (true) {
      {
        std::unique_lock<std::mutex> lk(s->m);
        s->cv_start.wait(lk, [&] { return s->stop || s->generation != seen; });
        if (s->stop) return;
        seen = s->generation;
      }
      drain(*s);
      {
        std::lock_guard<std::mutex> lk(s->m);
        if (--s->busy == 0) s->cv_done.notify_one();
      }
    }
  }

  int num_threads_;
  std::mutex run_m_;
  std::unique_ptr<State> state_;
};

}  // namespace bmclip
