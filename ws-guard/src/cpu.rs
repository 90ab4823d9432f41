//! Running a piece of work on one chosen CPU: the refusal memos are per-CPU state that only a
//! program run on their own CPU may change (see `ws_guard_common::memo`).

use std::io;

/// The CPU the calling thread runs on now (one it is allowed to run on).
pub fn current() -> io::Result<usize> {
    // SAFETY: a plain query.
    let cpu = unsafe { libc::sched_getcpu() };
    usize::try_from(cpu).map_err(|_| io::Error::last_os_error())
}

/// Runs `f` with the calling thread pinned to `cpu`, then gives the thread its CPUs back.
pub fn on_cpu<T>(cpu: usize, f: impl FnOnce() -> T) -> io::Result<T> {
    // SAFETY: cpu_set_t is plain data; the calls get valid pointers and its size.
    unsafe {
        let mut old: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of_val(&old), &mut old) != 0 {
            return Err(io::Error::last_os_error());
        }
        let mut one: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut one);
        if libc::sched_setaffinity(0, std::mem::size_of_val(&one), &one) != 0 {
            return Err(io::Error::last_os_error());
        }
        let out = f();
        if libc::sched_setaffinity(0, std::mem::size_of_val(&old), &old) != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_work_runs_on_the_cpu_and_the_thread_gets_its_cpus_back() {
        let cpu = current().unwrap();
        let ran_on = on_cpu(cpu, || current().unwrap()).unwrap();
        assert_eq!(ran_on, cpu);
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        assert_eq!(
            unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) },
            0
        );
        let allowed = (0..libc::CPU_SETSIZE as usize)
            .filter(|c| unsafe { libc::CPU_ISSET(*c, &set) })
            .count();
        let online = std::thread::available_parallelism().unwrap().get();
        assert!(
            allowed >= online.min(2),
            "{allowed} CPUs allowed after, {online} online"
        );
    }
}
