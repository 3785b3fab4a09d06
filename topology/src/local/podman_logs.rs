//! The last lines of a container's `k8s-file` log, read from the file.
//!
//! Podman before 4.7 prints lines that conmon logged in parts wrongly:
//! conmon reads the container's pipe 8 KiB at a time, and a read that ends
//! mid-line is logged as a partial (`P`) entry. Podman 4.3 (Debian 12) then
//! prints the line before it without its line end and the rest of the line
//! as a line of its own (podman#19545, fixed by podman#19562), so a
//! container that writes fast gets some of its lines joined and split.
//! The agent reads the log file itself when the container logs to one, and
//! joins the parts as the format says.
//!
//! The format, one entry per line: `TIMESTAMP STREAM TAG CONTENT`, `STREAM`
//! `stdout` or `stderr`, `TAG` `F` (the entry ends a line) or `P` (the line
//! goes on in the stream's next entry). The file is read from its end in
//! growing windows, never more than [`MAX_READ`] bytes of it.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::container::ContainerLogs;

/// The most of a log file one request reads, from its end.
pub(super) const MAX_READ: u64 = 4 << 20;
/// The first window read from the end; each next one is four times larger.
const FIRST_WINDOW: u64 = 64 << 10;

/// The last `tail` lines of the `k8s-file` log at `path`, at most
/// `max_bytes` of them (newest whole lines kept, `truncated` set when older
/// ones were dropped or lie beyond [`MAX_READ`]).
pub(super) fn tail_k8s_file(path: &Path, tail: u32, max_bytes: usize) -> io::Result<ContainerLogs> {
    let file = File::open(path)?;
    // The file only grows while it is read (conmon appends), so the bytes
    // up to this length stay as they were.
    let len = file.metadata()?.len();
    let tail = tail as usize;
    let mut window = FIRST_WINDOW.min(len);
    loop {
        let start = len - window;
        let mut buf = vec![0u8; window as usize];
        file.read_exact_at(&mut buf, start)?;
        let lines = lines(&buf, start == 0);
        let newest = &lines[lines.len().saturating_sub(tail)..];
        let bytes: usize = newest.iter().map(|line| line.len() + 1).sum();
        let enough = lines.len() >= tail || bytes > max_bytes;
        if start == 0 || enough || window >= MAX_READ {
            let mut text = Vec::with_capacity(bytes);
            for line in newest {
                text.extend_from_slice(line);
                text.push(b'\n');
            }
            // Older lines exist that were not read: the answer is cut.
            return Ok(ContainerLogs::from_output(&text, max_bytes, !enough && start != 0));
        }
        window = (window * 4).min(len).min(MAX_READ);
    }
}

/// The lines the entries in `buf` make, oldest first. `whole`: `buf` is
/// the file from its start. Otherwise `buf` may begin inside an entry and
/// inside a line: its first entry is skipped, and so is each stream's
/// first line, whose earlier parts may lie before `buf`. An entry still
/// being written (no line end yet) is left out; a line whose last part was
/// logged and whose end was not yet (a prompt, a line being written) comes
/// last.
fn lines(buf: &[u8], whole: bool) -> Vec<Vec<u8>> {
    let mut body = buf;
    if !whole {
        body = match body.iter().position(|&b| b == b'\n') {
            Some(end) => &body[end + 1..],
            None => &[],
        };
    }
    body = match body.iter().rposition(|&b| b == b'\n') {
        Some(end) => &body[..end],
        None => &[],
    };
    let mut lines = Vec::new();
    // Per stream (stdout, stderr): the parts of the line being joined, and
    // whether the line began inside `buf`.
    let mut pending: [Vec<u8>; 2] = Default::default();
    let mut known = [whole; 2];
    if body.is_empty() {
        return lines;
    }
    for entry in body.split(|&b| b == b'\n') {
        let Some(Entry { stream, partial, content }) = Entry::parse(entry) else { continue };
        pending[stream].extend_from_slice(content);
        if !partial {
            let line = std::mem::take(&mut pending[stream]);
            if known[stream] {
                lines.push(line);
            }
            known[stream] = true;
        }
    }
    for (stream, line) in pending.into_iter().enumerate() {
        if known[stream] && !line.is_empty() {
            lines.push(line);
        }
    }
    lines
}

/// One log entry.
struct Entry<'a> {
    /// 0 stdout, 1 stderr.
    stream: usize,
    /// The line goes on in the stream's next entry.
    partial: bool,
    content: &'a [u8],
}

impl<'a> Entry<'a> {
    /// `TIMESTAMP STREAM TAG[ CONTENT]`; `None` for anything else.
    fn parse(entry: &'a [u8]) -> Option<Self> {
        let mut fields = entry.splitn(4, |&b| b == b' ');
        let _timestamp = fields.next()?;
        let stream = match fields.next()? {
            b"stdout" => 0,
            b"stderr" => 1,
            _ => return None,
        };
        // A tag may carry more flags after `:`; the first says full or partial.
        let partial = match fields.next()?.split(|&b| b == b':').next()? {
            b"P" => true,
            b"F" => false,
            _ => return None,
        };
        Some(Self { stream, partial, content: fields.next().unwrap_or_default() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: &str = "2026-11-28T04:03:24.328926739+00:00";

    fn log(entries: &[(&str, &str, &str)]) -> Vec<u8> {
        entries
            .iter()
            .map(|(stream, tag, content)| format!("{T} {stream} {tag} {content}\n"))
            .collect::<String>()
            .into()
    }

    fn text(lines: Vec<Vec<u8>>) -> Vec<String> {
        lines.into_iter().map(|line| String::from_utf8(line).unwrap()).collect()
    }

    #[test]
    fn partial_entries_are_joined_per_stream() {
        let buf = log(&[
            ("stdout", "F", "one"),
            ("stdout", "P", "tw"),
            ("stderr", "F", "err"),
            ("stdout", "P", "o "),
            ("stdout", "F", "end"),
            ("stdout", "F", ""),
            ("stderr", "P", "prompt> "),
        ]);
        assert_eq!(text(lines(&buf, true)), ["one", "err", "two end", "", "prompt> "]);
    }

    #[test]
    fn a_window_starting_inside_a_line_drops_what_it_cannot_see_whole() {
        let whole = log(&[
            ("stdout", "F", "zero"),
            ("stdout", "P", "aaaa"),
            ("stdout", "P", "bbbb"),
            ("stdout", "F", "cccc"),
            ("stderr", "F", "err"),
            ("stdout", "F", "last"),
        ]);
        // From inside the second entry: its rest is skipped, and so is the
        // first line of each stream (stdout's began before the window;
        // stderr's might have).
        let inside = &whole[whole.len() / 4..];
        assert_eq!(text(lines(inside, false)), ["last"]);
        // An entry still being written is left out.
        assert_eq!(text(lines(&whole[..whole.len() - 3], true)), ["zero", "aaaabbbbcccc", "err"]);
    }

    #[test]
    fn malformed_entries_are_skipped_and_an_empty_content_is_an_empty_line() {
        let mut buf = log(&[("stdout", "F", "a")]);
        buf.extend_from_slice(b"garbage\nT stdin F x\nT stdout X y\n");
        buf.extend_from_slice(format!("{T} stdout F\n{T} stdout F:extra b\n").as_bytes());
        assert_eq!(text(lines(&buf, true)), ["a", "", "b"]);
        assert!(lines(b"", true).is_empty() && lines(b"no line end", false).is_empty());
    }

    #[test]
    fn the_file_is_read_from_its_end_within_the_limits() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctr.log");
        // 20,000 lines of 100 bytes in parts of 30 (5.6 MiB of file).
        let mut buf = Vec::new();
        for i in 0..20_000 {
            let line = format!("line {i:05} {}", "x".repeat(89));
            for (n, part) in line.as_bytes().chunks(30).enumerate() {
                let tag = if (n + 1) * 30 >= line.len() { "F" } else { "P" };
                buf.extend_from_slice(format!("{T} stdout {tag} ").as_bytes());
                buf.extend_from_slice(part);
                buf.push(b'\n');
            }
        }
        std::fs::write(&path, &buf).unwrap();
        let want = |i: usize| format!("line {i:05} {}", "x".repeat(89));
        let last = tail_k8s_file(&path, 3, 1 << 20).unwrap();
        assert_eq!(last.lines, [want(19_997), want(19_998), want(19_999)]);
        assert!(!last.truncated);
        // More lines than the first window holds: it reads further back.
        let many = tail_k8s_file(&path, 5_000, 1 << 20).unwrap();
        assert_eq!(many.lines.len(), 5_000);
        assert!(many.lines.iter().enumerate().all(|(n, line)| *line == want(15_000 + n)) && !many.truncated);
        // The byte limit keeps the newest whole lines.
        let bounded = tail_k8s_file(&path, 5_000, 1000).unwrap();
        assert_eq!(bounded.lines, (19_991..20_000).map(want).collect::<Vec<_>>());
        assert!(bounded.truncated);
        // Lines beyond the read limit are not read, and the answer says so.
        let all = tail_k8s_file(&path, 20_000, usize::MAX).unwrap();
        assert!(all.truncated && all.lines.len() < 20_000 && all.lines.len() > 10_000, "{}", all.lines.len());
        assert_eq!(all.lines.last(), Some(&want(19_999)));
        // A short file: everything, nothing cut.
        std::fs::write(&path, log(&[("stdout", "P", "a"), ("stdout", "F", "b")])).unwrap();
        assert_eq!(
            tail_k8s_file(&path, 10, 100).unwrap(),
            ContainerLogs { lines: vec!["ab".into()], truncated: false }
        );
    }
}
