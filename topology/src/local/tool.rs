//! Running the device's own tools (`systemctl`, `apt-get`): arguments as a vector, never a shell; a time limit; bounded output.
//!
//! A tool runs in a task of its own that drains its output and reaps it.
//! A tool that may be stopped ([`Tool::killable`]) is killed when its time
//! is up, and also when the caller stops waiting (the agent's Interpret
//! timeout drops the future). One that must not be cut short (`dpkg`
//! unpacking a package) is left to finish on its own: only the wait for it
//! ends.

use std::ffi::OsString;
use std::io;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;
use tokio::task::JoinHandle;

/// Most bytes of each output stream kept: the last ones, where tools say
/// what went wrong.
pub(crate) const MAX_OUTPUT_BYTES: usize = 64 * 1024;

/// One run of a tool, built with consuming setters.
#[derive(Debug)]
pub(crate) struct Tool {
    program: &'static str,
    args: Vec<OsString>,
    env: Vec<(&'static str, OsString)>,
    timeout: Duration,
    killable: bool,
}

/// What a tool printed (each stream's last [`MAX_OUTPUT_BYTES`], lossy
/// UTF-8) and its exit code (`None`: killed by a signal).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ToolOutput {
    pub(crate) code: Option<i32>,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
}

impl ToolOutput {
    /// Whether it exited with 0.
    pub(crate) fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// The tool's own message: its standard error, else its output, trimmed.
    pub(crate) fn message(&self) -> String {
        let text = if self.stderr.trim().is_empty() { &self.stdout } else { &self.stderr };
        match (text.trim(), self.code) {
            ("", Some(code)) => format!("exit status {code}, no message"),
            ("", None) => "killed by a signal, no message".to_owned(),
            (text, _) => text.to_owned(),
        }
    }
}

/// Why a tool did not run to its end.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ToolError {
    /// The program is not installed.
    #[error("{program} is not installed (not found on PATH)")]
    NotFound { program: &'static str },
    /// It could not be started.
    #[error("cannot run {program}: {source}")]
    SpawnFailed {
        program: &'static str,
        #[source]
        source: io::Error,
    },
    /// It did not finish in time.
    #[error("{program} did not finish within {secs} s")]
    TimedOut { program: &'static str, secs: u64 },
}

impl Tool {
    /// `program` (looked up on `PATH`) with `args`, killable, 30 s.
    pub(crate) fn new<I, A>(program: &'static str, args: I) -> Self
    where
        I: IntoIterator<Item = A>,
        A: Into<OsString>,
    {
        Self {
            program,
            args: args.into_iter().map(Into::into).collect(),
            env: Vec::new(),
            timeout: Duration::from_secs(30),
            killable: true,
        }
    }

    /// Sets an environment variable for the tool.
    #[must_use]
    pub(crate) fn env(mut self, key: &'static str, value: impl Into<OsString>) -> Self {
        self.env.push((key, value.into()));
        self
    }

    /// How long to wait for it.
    #[must_use]
    pub(crate) fn timeout(self, timeout: Duration) -> Self {
        Self { timeout, ..self }
    }

    /// Whether it is killed when the wait ends early (default: yes).
    #[must_use]
    pub(crate) fn killable(self, killable: bool) -> Self {
        Self { killable, ..self }
    }

    /// The command line, for messages (`systemctl --root=/x enable a.service`).
    pub(crate) fn display(&self) -> String {
        let mut text = self.program.to_owned();
        for arg in &self.args {
            text.push(' ');
            text.push_str(&arg.to_string_lossy());
        }
        text
    }

    /// Runs it to its end, or until its time is up.
    pub(crate) async fn run(self) -> Result<ToolOutput, ToolError> {
        let program = self.program;
        let mut command = Command::new(program);
        command
            .args(&self.args)
            // Messages in one language, without colours or a pager.
            .env("LC_ALL", "C")
            .env("SYSTEMD_COLORS", "0")
            .env("SYSTEMD_PAGER", "")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(self.killable);
        let mut child = command.spawn().map_err(|source| match source.kind() {
            io::ErrorKind::NotFound => ToolError::NotFound { program },
            _ => ToolError::SpawnFailed { program, source },
        })?;
        let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
        let task = tokio::spawn(async move {
            let (stdout, stderr, status) = tokio::join!(read_tail(stdout), read_tail(stderr), child.wait());
            (stdout, stderr, status)
        });
        let mut task = AbortOnDrop { task, abort: self.killable };
        match tokio::time::timeout(self.timeout, &mut task.task).await {
            Ok(Ok((stdout, stderr, status))) => {
                let status = status.map_err(|source| ToolError::SpawnFailed { program, source })?;
                Ok(ToolOutput { code: status.code(), stdout, stderr })
            }
            Ok(Err(join)) => {
                Err(ToolError::SpawnFailed { program, source: io::Error::other(join.to_string()) })
            }
            Err(_) => Err(ToolError::TimedOut { program, secs: self.timeout.as_secs() }),
        }
    }
}

/// Whether `root` is the host's `/` (the same directory, not only the same
/// name): the only root the host's own tools (a package manager, a running
/// service manager) act on.
pub(crate) fn is_host_root(root: &std::path::Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(root), std::fs::metadata("/")) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
        _ => false,
    }
}

/// The task running a tool; aborting it drops the child, which kills a
/// killable one (`kill_on_drop`). A tool that must finish is left running.
struct AbortOnDrop<T> {
    task: JoinHandle<T>,
    abort: bool,
}

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        if self.abort {
            self.task.abort();
        }
    }
}

/// Reads `stream` to its end, keeping the last [`MAX_OUTPUT_BYTES`].
async fn read_tail(stream: Option<impl AsyncRead + Unpin>) -> String {
    let Some(mut stream) = stream else { return String::new() };
    let mut kept: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 8192];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                kept.extend_from_slice(&buf[..n]);
                if kept.len() > 2 * MAX_OUTPUT_BYTES {
                    kept.drain(..kept.len() - MAX_OUTPUT_BYTES);
                }
            }
        }
    }
    if kept.len() > MAX_OUTPUT_BYTES {
        kept.drain(..kept.len() - MAX_OUTPUT_BYTES);
    }
    String::from_utf8_lossy(&kept).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn runs_with_arguments_as_given_and_keeps_the_tail_of_long_output() {
        // One argument with a space and a `;` stays one argument: no shell.
        let out = Tool::new("printf", ["%s|", "a b; echo x"]).run().await.unwrap();
        assert_eq!((out.code, out.stdout.as_str()), (Some(0), "a b; echo x|"));

        let big = Tool::new("head", ["-c", "300000", "/dev/zero"]).run().await.unwrap();
        assert!(big.success());
        assert_eq!(big.stdout.len(), MAX_OUTPUT_BYTES);

        let failed = Tool::new("ls", ["/nonexistent-harmony"]).run().await.unwrap();
        assert!(!failed.success());
        assert!(failed.message().contains("No such file"), "{}", failed.message());
    }

    #[tokio::test]
    async fn a_missing_tool_and_a_slow_one_are_typed_errors_and_the_slow_one_is_killed() {
        assert!(matches!(
            Tool::new("harmony-no-such-tool", [""; 0]).run().await,
            Err(ToolError::NotFound { program: "harmony-no-such-tool" })
        ));
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("still-running");
        let script = format!("sleep 1; touch {}", marker.display());
        let slow = Tool::new("sh", ["-c", script.as_str()]).timeout(Duration::from_millis(100));
        assert!(matches!(slow.run().await, Err(ToolError::TimedOut { program: "sh", .. })));
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(!marker.exists(), "a killable tool is killed when its time is up");

        // One that must finish is only waited for less long.
        let script = format!("sleep 0.5; touch {}", marker.display());
        let unkillable =
            Tool::new("sh", ["-c", script.as_str()]).timeout(Duration::from_millis(50)).killable(false);
        assert!(matches!(unkillable.run().await, Err(ToolError::TimedOut { .. })));
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(marker.exists(), "a tool that must finish runs to its end");
    }
}
