//! Issue 9 §8: power loss. A power cut keeps only what reached the disk,
//! so what the agent writes must be made durable in the right order: a
//! new temp file (`O_CREAT|O_EXCL`), written, fsynced, renamed over the
//! final name, then the directory fsynced; a directory it creates is made
//! durable in its parent (fsync of the parent) before a file beneath it
//! counts as written; a removal is made durable before the record that
//! forgets the removed resource; and a new deployment's record is durable
//! before its first Score changes anything.
//!
//! The real agent binary runs under `strace -f -y`; the test parses the
//! system calls it made (files are reached through descriptors of their
//! directories, `openat2`/`renameat` relative to them, so calls are
//! matched by descriptor and the paths `-y` prints for them) and checks
//! that order for a managed file (created in new directories, rewritten,
//! one pruned), the deployment's record and `status.json` in the state
//! directory.
//!
//! Needs `strace` (`scripts/install-test-deps` installs it; CI sets
//! `HARMONY_REQUIRE_STRACE=1`, and a missing or unusable strace then
//! fails the test instead of skipping it).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use harmony_e2e::{file_score, until_status, workspace_bin, Fleet, WAIT};
use harmony_score_wire::DeviceId;

const SYSCALLS: &str = "openat,openat2,open,creat,write,pwrite64,writev,fsync,fdatasync,\
                        rename,renameat,renameat2,unlink,unlinkat,mkdir,mkdirat,close";
const TEMP_PREFIX: &str = ".harmony-tmp.";

/// Whether strace can trace here; `false` (with why) only when
/// `HARMONY_REQUIRE_STRACE` is unset.
fn strace_ready() -> bool {
    let required = std::env::var_os("HARMONY_REQUIRE_STRACE").is_some();
    let works = Command::new("strace")
        .args(["-f", "-o", "/dev/null", "true"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output();
    let why = match works {
        Ok(out) if out.status.success() => return true,
        Ok(out) => format!("strace cannot trace here: {}", String::from_utf8_lossy(&out.stderr).trim()),
        Err(err) => format!("no strace binary ({err}); scripts/install-test-deps installs it"),
    };
    assert!(!required, "HARMONY_REQUIRE_STRACE is set: {why}");
    eprintln!("power_loss: skipped: {why}");
    false
}

/// One system call as strace printed it (an interrupted one joined with
/// its resumption, placed where it returned).
#[derive(Debug, Clone)]
struct Call {
    tid: u32,
    name: String,
    args: Vec<String>,
    ret: String,
    line: String,
}

impl Call {
    /// The descriptor number and the path `-y` printed for argument `i`
    /// (`12</tmp/x>`, `AT_FDCWD</tmp>`).
    fn fd(&self, i: usize) -> Option<(Option<i64>, &str)> {
        let arg = self.args.get(i)?;
        let open = arg.find('<')?;
        let path = arg[open + 1..].strip_suffix('>')?;
        Some((arg[..open].parse().ok(), path))
    }

    /// A quoted string argument (paths are printed whole).
    fn string(&self, i: usize) -> Option<String> {
        let arg = self.args.get(i)?;
        let inner = arg.strip_prefix('"')?.strip_suffix('"')?;
        Some(inner.replace("\\\"", "\"").replace("\\\\", "\\"))
    }

    /// The number returned, when it succeeded.
    fn ok(&self) -> Option<i64> {
        let number = self.ret.split(['<', ' ']).next()?.parse::<i64>().ok()?;
        (number >= 0).then_some(number)
    }

    /// The path a `*at` call names by descriptor `dir_arg` and name `name_arg`.
    fn at_path(&self, dir_arg: usize, name_arg: usize) -> Option<PathBuf> {
        let name = self.string(name_arg)?;
        if name.starts_with('/') {
            return Some(PathBuf::from(name));
        }
        Some(Path::new(self.fd(dir_arg)?.1).join(name))
    }

    /// Source and destination of a rename, whichever form.
    fn renamed(&self) -> Option<(PathBuf, PathBuf)> {
        match self.name.as_str() {
            "rename" => Some((PathBuf::from(self.string(0)?), PathBuf::from(self.string(1)?))),
            "renameat" | "renameat2" => Some((self.at_path(0, 1)?, self.at_path(2, 3)?)),
            _ => None,
        }
    }

    /// The directory a successful mkdir created.
    fn made_dir(&self) -> Option<PathBuf> {
        self.ok()?;
        match self.name.as_str() {
            "mkdir" => self.string(0).map(PathBuf::from),
            "mkdirat" => self.at_path(0, 1),
            _ => None,
        }
    }

    /// The path a `fsync`/`fdatasync` made durable.
    fn synced(&self) -> Option<&str> {
        matches!(self.name.as_str(), "fsync" | "fdatasync").then_some(())?;
        self.ok()?;
        Some(self.fd(0)?.1)
    }
}

/// Splits a call's argument list at its top-level commas.
fn split_args(text: &str) -> Vec<String> {
    let (mut args, mut current) = (Vec::new(), String::new());
    let (mut depth, mut quoted, mut escaped) = (0i32, false, false);
    for c in text.chars() {
        if quoted {
            current.push(c);
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => quoted = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => quoted = true,
            '{' | '[' | '<' | '(' => depth += 1,
            '}' | ']' | '>' | ')' => depth -= 1,
            ',' if depth == 0 => {
                args.push(current.trim().to_owned());
                current.clear();
                continue;
            }
            _ => {}
        }
        current.push(c);
    }
    if !current.trim().is_empty() {
        args.push(current.trim().to_owned());
    }
    args
}

/// Parses `strace -f` output.
fn parse_trace(text: &str) -> Vec<Call> {
    let mut pending: HashMap<u32, String> = HashMap::new();
    let mut calls = Vec::new();
    for line in text.lines() {
        let Some((tid, rest)) = line.split_once(' ') else { continue };
        let Ok(tid) = tid.parse::<u32>() else { continue };
        let rest = rest.trim_start();
        if rest.starts_with("+++") || rest.starts_with("---") {
            continue;
        }
        let full = if let Some(head) = rest.strip_suffix("<unfinished ...>") {
            pending.insert(tid, head.trim_end().to_owned());
            continue;
        } else if let Some(resumed) = rest.strip_prefix("<... ") {
            let Some((_, tail)) = resumed.split_once(" resumed>") else { continue };
            let Some(head) = pending.remove(&tid) else { continue };
            // The interrupted part ends after an argument (", " follows).
            let joined = if head.ends_with('(') || tail.starts_with(')') || tail.starts_with(',') {
                format!("{head}{tail}")
            } else {
                format!("{head} {tail}")
            };
            joined
        } else {
            rest.to_owned()
        };
        let Some(open) = full.find('(') else { continue };
        // strace pads short calls to a column before ` = `: the return
        // value follows the last ` = ` that comes after the closing `)`.
        let Some((close, ret)) = full
            .rmatch_indices(" = ")
            .map(|(at, _)| (full[..at].trim_end(), at))
            .find(|(head, _)| head.ends_with(')'))
            .map(|(head, at)| (head.len() - 1, full[at + 3..].trim().to_owned()))
        else {
            continue;
        };
        if close < open {
            continue;
        }
        calls.push(Call {
            tid,
            name: full[..open].to_owned(),
            args: split_args(&full[open + 1..close]),
            ret,
            line: full.clone(),
        });
    }
    calls
}

/// One atomic write of a file, as found in the trace: indices of its calls.
#[derive(Debug)]
struct AtomicWrite {
    open: usize,
    bytes: i64,
    fsync: usize,
    rename: usize,
    dir_fsync: usize,
}

/// Every rename onto `target` in the trace, each checked to be the end of
/// an atomic write: `Ok` with its calls, or `Err` naming what is missing.
fn atomic_writes(calls: &[Call], target: &Path) -> Vec<Result<AtomicWrite, String>> {
    let dir = target.parent().expect("a file in a directory");
    let renames: Vec<usize> = calls
        .iter()
        .enumerate()
        .filter(|(_, c)| c.ok().is_some() && c.renamed().is_some_and(|(_, to)| to == target))
        .map(|(i, _)| i)
        .collect();
    renames.into_iter().map(|rename| check_write(calls, rename, dir)).collect()
}

fn check_write(calls: &[Call], rename: usize, dir: &Path) -> Result<AtomicWrite, String> {
    let call = &calls[rename];
    let (tmp, to) = call.renamed().expect("a rename");
    let context = format!("rename #{rename} `{}`", call.line);
    if tmp.parent() != Some(dir) {
        return Err(format!("{context}: the temp file is not in {}", dir.display()));
    }
    if !tmp.file_name().is_some_and(|n| n.to_string_lossy().starts_with(TEMP_PREFIX)) {
        return Err(format!("{context}: renames {} rather than a temp file of the agent", tmp.display()));
    }
    let tid = call.tid;
    let tmp_text = tmp.to_string_lossy().into_owned();
    // The temp file's creation, in the same thread before the rename.
    let open = (0..rename)
        .rev()
        .find(|&i| {
            let c = &calls[i];
            c.tid == tid
                && c.ok().is_some()
                && match c.name.as_str() {
                    "openat" => c.at_path(0, 1).as_deref() == Some(tmp.as_path()),
                    "open" | "creat" => c.string(0).as_deref() == Some(tmp_text.as_str()),
                    _ => false,
                }
        })
        .ok_or_else(|| format!("{context}: no open of {} before it", tmp.display()))?;
    let opened = &calls[open];
    let flags = if opened.name == "openat" { opened.args.get(2) } else { opened.args.get(1) };
    let flags = flags.map(String::as_str).unwrap_or("");
    if !(flags.contains("O_CREAT") && flags.contains("O_EXCL")) && opened.name != "creat" {
        return Err(format!("{context}: the temp file was opened without O_CREAT|O_EXCL: `{}`", opened.line));
    }
    let fd = opened.ok().expect("opened");
    let on_fd = |c: &Call| c.fd(0).is_some_and(|(n, path)| n == Some(fd) && path == tmp_text);
    let between = open + 1..rename;
    let writes: Vec<usize> = between
        .clone()
        .filter(|&i| matches!(calls[i].name.as_str(), "write" | "pwrite64" | "writev") && on_fd(&calls[i]))
        .collect();
    let bytes: i64 = writes.iter().filter_map(|&i| calls[i].ok()).sum();
    if writes.iter().any(|&i| calls[i].ok().is_none()) {
        return Err(format!("{context}: a write to the temp file failed"));
    }
    let fsync = between
        .clone()
        .rev()
        .find(|&i| {
            matches!(calls[i].name.as_str(), "fsync" | "fdatasync")
                && on_fd(&calls[i])
                && calls[i].ok().is_some()
        })
        .ok_or_else(|| format!("{context}: the temp file was not fsynced before the rename"))?;
    if let Some(&last) = writes.last() {
        if last > fsync {
            return Err(format!("{context}: written after its fsync (`{}`)", calls[last].line));
        }
    }
    // The directory's fsync after the rename, in the same thread, before
    // that thread renames anything else.
    let next_rename = (rename + 1..calls.len())
        .find(|&i| calls[i].tid == tid && calls[i].renamed().is_some())
        .unwrap_or(calls.len());
    let dir_text = dir.to_string_lossy();
    let dir_fsync = (rename + 1..next_rename)
        .find(|&i| calls[i].tid == tid && calls[i].synced() == Some(&*dir_text))
        .ok_or_else(|| {
            format!("{context}: {} was not fsynced after the rename of {}", dir.display(), to.display())
        })?;
    Ok(AtomicWrite { open, bytes, fsync, rename, dir_fsync })
}

/// Directories the agent created on the way to `target` (beneath `top`),
/// each with the index of its mkdir, whose parent was not fsynced between
/// that mkdir and `by` (the end of the first write beneath it).
fn undurable_dirs(calls: &[Call], target: &Path, top: &Path, by: usize) -> Vec<String> {
    let mut problems = Vec::new();
    for (i, call) in calls.iter().enumerate().take(by) {
        let Some(made) = call.made_dir() else { continue };
        if !(target.starts_with(&made) && made.starts_with(top)) {
            continue;
        }
        let parent = made.parent().expect("a parent").to_string_lossy().into_owned();
        if !(i + 1..=by).any(|j| calls[j].synced() == Some(parent.as_str())) {
            problems.push(format!(
                "{} was created (`{}`) and its parent {parent} not fsynced before {} counted as written",
                made.display(),
                call.line,
                target.display()
            ));
        }
    }
    problems
}

/// `strace -f -y` running `harmony-agent run`; both killed on drop.
struct TracedAgent {
    strace: Child,
    trace: PathBuf,
}

impl TracedAgent {
    fn start(args: &[&str], trace: &Path, log: &Path) -> Self {
        let strace = Command::new("strace")
            .args(["-f", "-y", "-qq", "-s", "16", "-e"])
            .arg(format!("trace={SYSCALLS}"))
            .arg("-o")
            .arg(trace)
            .arg(workspace_bin("harmony-agent"))
            .arg("run")
            .args(args)
            .env("HARMONY_LOG", "harmony_agent=debug,info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).expect("agent log"))
            .spawn()
            .expect("start strace");
        Self { strace, trace: trace.to_path_buf() }
    }

    /// The agent's pid: strace's child.
    fn agent_pid(&self) -> Option<u32> {
        let id = self.strace.id();
        let children = std::fs::read_to_string(format!("/proc/{id}/task/{id}/children")).ok()?;
        children.split_whitespace().next()?.parse().ok()
    }

    /// Stops the agent with SIGTERM, waits for strace to finish writing,
    /// and returns the trace.
    fn stop(mut self) -> String {
        let deadline = Instant::now() + WAIT;
        let pid = loop {
            if let Some(pid) = self.agent_pid() {
                break pid;
            }
            assert!(Instant::now() < deadline, "the traced agent is gone");
            std::thread::sleep(Duration::from_millis(20));
        };
        let _ = Command::new("kill").args(["-TERM", &pid.to_string()]).status();
        loop {
            if let Ok(Some(_)) = self.strace.try_wait() {
                break;
            }
            assert!(Instant::now() < deadline, "the traced agent did not stop");
            std::thread::sleep(Duration::from_millis(20));
        }
        std::fs::read_to_string(&self.trace).expect("the trace")
    }
}

impl Drop for TracedAgent {
    fn drop(&mut self) {
        if let Ok(None) = self.strace.try_wait() {
            if let Some(pid) = self.agent_pid() {
                let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
            }
            let _ = self.strace.kill();
            let _ = self.strace.wait();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_records_and_status_reach_the_disk_in_an_order_a_power_cut_cannot_tear() {
    if !strace_ready() {
        return;
    }
    let f = Fleet::new().await;
    let device = DeviceId::new("power-1").unwrap();
    let folder = f.folder("power");
    let (root, state) = (folder.join("root"), folder.join("state"));
    std::fs::create_dir_all(&root).unwrap();
    // Canonical, as the kernel prints descriptors' paths.
    let (root, folder) = (root.canonicalize().unwrap(), folder.canonicalize().unwrap());
    let state = folder.join(state.file_name().unwrap());
    let url = f.nats.url();
    let args = harmony_e2e::agent_args(device.as_str(), &url, &state, &root);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let agent = TracedAgent::start(&args, &folder.join("trace"), &folder.join("agent.log"));
    until_status(&f.client, &device, "online", |s| s.info.is_some()).await;

    let (one, two) = ("one\n".repeat(16 * 1024), "second generation\n".repeat(4000));
    let g1 = f
        .deploy(
            &device,
            "app",
            vec![file_score("/etc/app/a.conf", &one), file_score("/etc/app/old.conf", "old\n")],
        )
        .await;
    f.applied(&device, "app", g1).await;
    // The second generation rewrites a.conf and prunes old.conf.
    let g2 = f.deploy(&device, "app", vec![file_score("/etc/app/a.conf", &two)]).await;
    f.applied(&device, "app", g2).await;
    assert_eq!(std::fs::read_to_string(root.join("etc/app/a.conf")).unwrap(), two);
    assert!(!root.join("etc/app/old.conf").exists());
    let trace = agent.stop();
    let calls = parse_trace(&trace);
    assert!(calls.len() > 100, "strace printed {} calls:\n{trace}", calls.len());

    let mut problems = Vec::new();
    let mut report = Vec::new();
    let managed = root.join("etc/app/a.conf");
    let record = state.join("deployments/app.state");
    let status_json = state.join("status.json");
    for (what, target, top, lengths) in [
        ("managed file", &managed, &root, vec![one.len() as i64, two.len() as i64]),
        ("deployment record", &record, &state, vec![]),
    ] {
        let writes = atomic_writes(&calls, target);
        if writes.is_empty() {
            problems.push(format!("{what}: no write of {} in the trace", target.display()));
            continue;
        }
        let good: Vec<&AtomicWrite> = writes.iter().filter_map(|w| w.as_ref().ok()).collect();
        problems.extend(writes.iter().filter_map(|w| w.as_ref().err()).map(|e| format!("{what}: {e}")));
        if !lengths.is_empty() {
            let written: Vec<i64> = good.iter().map(|w| w.bytes).collect();
            if written != lengths {
                problems.push(format!("{what}: wrote {written:?} bytes in its writes, not {lengths:?}"));
            }
        }
        if let Some(first) = good.first() {
            problems.extend(
                undurable_dirs(&calls, target, top, first.dir_fsync)
                    .into_iter()
                    .map(|p| format!("{what}: {p}")),
            );
        }
        report.push(format!("{what}: {} atomic writes", good.len()));
    }

    // status.json is a mirror rewritten at every start and change: replaced
    // atomically (a reader never sees half of it), never flushed (issue 10:
    // it cost two fsyncs per status change and protects nothing).
    let mirror_renames = calls
        .iter()
        .filter(|c| c.ok().is_some() && c.renamed().is_some_and(|(_, to)| to == status_json.as_path()))
        .count();
    if mirror_renames == 0 {
        problems.push("status.json: never replaced by a rename".to_owned());
    }
    report.push(format!("status.json: {mirror_renames} atomic replacements, not flushed"));

    // The record is durable before the first change to the device: what
    // the deployment owns is on disk before it exists.
    let first_record = atomic_writes(&calls, &record).into_iter().find_map(Result::ok);
    let first_file = atomic_writes(&calls, &managed).into_iter().find_map(Result::ok);
    if let (Some(record_write), Some(file_write)) = (&first_record, &first_file) {
        if record_write.dir_fsync > file_write.open {
            problems.push(format!(
                "the first record write was durable (#{}) only after the first managed file was begun (#{})",
                record_write.dir_fsync, file_write.open
            ));
        }
    }

    // The prune: old.conf's removal is durable before the record that
    // no longer owns it.
    let old_conf = root.join("etc/app/old.conf");
    let dir_text = old_conf.parent().unwrap().to_string_lossy().into_owned();
    match calls.iter().position(|c| {
        c.name == "unlinkat" && c.ok().is_some() && c.at_path(0, 1).as_deref() == Some(old_conf.as_path())
    }) {
        None => problems.push("no unlinkat of old.conf in the trace".to_owned()),
        Some(unlink) => {
            let next_record = (unlink..calls.len())
                .find(|&i| calls[i].ok().is_some() && calls[i].renamed().is_some_and(|(_, to)| to == record));
            match next_record {
                None => problems.push("no record written after the prune".to_owned()),
                Some(saved) => {
                    if !(unlink + 1..saved).any(|i| calls[i].synced() == Some(dir_text.as_str())) {
                        problems.push(format!(
                            "old.conf was removed (#{unlink} `{}`) and the record forgetting it renamed into place \
                             (#{saved}) with no fsync of {dir_text} between: after a power cut the file may come \
                             back, owned by nobody",
                            calls[unlink].line
                        ));
                    }
                }
            }
        }
    }

    println!("power_loss: {} system calls traced; {}", calls.len(), report.join("; "));
    if !problems.is_empty() {
        let kept = std::env::temp_dir().join(format!("harmony-power-loss-trace.{}", std::process::id()));
        let _ = std::fs::write(&kept, &trace);
        panic!("power-cut ordering violations (trace kept in {}):\n{}", kept.display(), problems.join("\n"));
    }
}

#[test]
fn the_parser_joins_interrupted_calls_and_reads_descriptors() {
    let text = "\
101 openat(11</r/etc>, \".harmony-tmp.1.a.0\", O_WRONLY|O_CREAT|O_EXCL|O_CLOEXEC, 0644 <unfinished ...>
102 write(4<anon_inode:[eventfd]>, \"\\1\\0\", 8) = 8
101 <... openat resumed>)             = 12</r/etc/.harmony-tmp.1.a.0>
101 write(12</r/etc/.harmony-tmp.1.a.0>, \"a, b) = c\"..., 5) = 5
101 fsync(12</r/etc/.harmony-tmp.1.a.0>) = 0
101 renameat(11</r/etc>, \".harmony-tmp.1.a.0\", 11</r/etc>, \"x.conf\") = 0
101 fsync(11</r/etc>)                   = 0
101 +++ exited with 0 +++
";
    let calls = parse_trace(text);
    assert_eq!(calls.len(), 6, "{calls:#?}");
    assert_eq!(calls[1].name, "openat");
    assert_eq!(calls[1].ok(), Some(12));
    assert_eq!(calls[2].args.len(), 3, "{:?}", calls[2].args);
    let writes = atomic_writes(&calls, Path::new("/r/etc/x.conf"));
    let write = writes[0].as_ref().unwrap();
    assert_eq!((write.open, write.bytes, write.fsync, write.rename, write.dir_fsync), (1, 5, 3, 4, 5));
    // Without the directory's fsync, or with the rename before the fsync,
    // the check fails.
    let no_dir_sync: Vec<Call> = calls[..5].to_vec();
    assert!(atomic_writes(&no_dir_sync, Path::new("/r/etc/x.conf"))[0].is_err());
    let mut swapped = calls.clone();
    swapped.swap(3, 4);
    assert!(atomic_writes(&swapped, Path::new("/r/etc/x.conf"))[0].is_err());
}
