//! Reading a NATS credentials file (a user JWT and its nkey seed) without a regular-expression engine.
//!
//! async-nats reads these files with the `regex` crate, and that call was
//! the agent's only path into it: 1.1 MB of the size-profile binary with
//! its tables and unwinding data (`docs/performance.md`). This parser takes what async-nats' pattern
//! takes: a decoration line (three dashes or more at both ends), one line
//! of `[A-Za-z0-9_.=-]`, another decoration line (line endings and
//! decorations judged as its pattern judges them); the first such block is
//! the JWT, the second the seed. The seed is secret: no error or log line
//! carries any part of the file.

use std::path::Path;
use std::sync::Arc;

use async_nats::{AuthError, ConnectOptions};
use zeroize::Zeroizing;

/// Why a credentials file cannot be used. No variant quotes the file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CredsError {
    /// The file could not be read.
    #[error("reading the credentials file {path} failed: {source}")]
    ReadFailed {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// Not a regular file (a FIFO would block the agent's start until
    /// someone wrote to it; a device file is no credentials file).
    #[error("the credentials file {path} is not a regular file")]
    NotAFile { path: String },
    /// Larger than any credentials file ([`MAX_CREDS_BYTES`]).
    #[error("the credentials file {path} is larger than {MAX_CREDS_BYTES} bytes")]
    TooLarge { path: String },
    /// Not UTF-8 text.
    #[error("the credentials file {path} is not UTF-8 text")]
    NotText { path: String },
    /// No decorated JWT block.
    #[error("the credentials file holds no user JWT block")]
    NoJwt,
    /// No second decorated block (the seed).
    #[error("the credentials file holds no nkey seed block")]
    NoSeed,
    /// The seed block is not a valid user seed.
    #[error("the credentials file's nkey seed is not valid")]
    BadSeed,
}

/// Largest credentials file read (a JWT with many permissions is a few KiB).
const MAX_CREDS_BYTES: u64 = 64 * 1024;

/// `options` authenticating with the JWT and seed of the file at `path`.
pub(super) async fn with_credentials_file(
    options: ConnectOptions,
    path: &Path,
) -> Result<ConnectOptions, CredsError> {
    let owned = path.to_owned();
    let read = tokio::task::spawn_blocking(move || read_credentials(&owned)).await;
    let (jwt, key_pair) = read.map_err(|e| CredsError::ReadFailed {
        path: path.display().to_string(),
        source: std::io::Error::other(e.to_string()),
    })??;
    let key_pair = Arc::new(key_pair);
    Ok(options.jwt(jwt, move |nonce| {
        let key_pair = Arc::clone(&key_pair);
        async move { key_pair.sign(&nonce).map_err(AuthError::new) }
    }))
}

/// The JWT and the key pair of the credentials file at `path`. Read with
/// `std::fs` into one buffer of the largest size taken (no copy in a
/// runtime's buffer, no reallocation leaving parts behind), wiped when
/// dropped.
fn read_credentials(path: &Path) -> Result<(String, nkeys::KeyPair), CredsError> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let shown = || path.display().to_string();
    let read_failed = |source| CredsError::ReadFailed { path: shown(), source };
    // Without blocking: opening a FIFO for reading waits for a writer.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
        .open(path)
        .map_err(read_failed)?;
    if !file.metadata().map_err(read_failed)?.is_file() {
        return Err(CredsError::NotAFile { path: shown() });
    }
    // One byte past the limit tells a file cut short from one that fits:
    // a longer file is refused whole, never read in part.
    let mut bytes = Zeroizing::new(Vec::with_capacity(MAX_CREDS_BYTES as usize + 1));
    file.take(MAX_CREDS_BYTES + 1).read_to_end(&mut bytes).map_err(read_failed)?;
    if bytes.len() as u64 > MAX_CREDS_BYTES {
        return Err(CredsError::TooLarge { path: shown() });
    }
    let contents = std::str::from_utf8(&bytes).map_err(|_| CredsError::NotText { path: shown() })?;
    let (jwt, seed) = parse(contents)?;
    let key_pair = nkeys::KeyPair::from_seed(seed).map_err(|_| CredsError::BadSeed)?;
    Ok((jwt.to_owned(), key_pair))
}

/// The JWT and the seed of a credentials file's text.
fn parse(contents: &str) -> Result<(&str, &str), CredsError> {
    // Split at `\n` only: `str::lines` would also take a `\r` off each line,
    // and then a line ending `\r\r\n` would pass for one ending `\r\n`.
    let mut blocks = Blocks { lines: contents.split('\n').collect(), at: 0 };
    let jwt = blocks.next().ok_or(CredsError::NoJwt)?;
    let seed = blocks.next().ok_or(CredsError::NoSeed)?;
    Ok((jwt, seed))
}

/// The decorated blocks of a credentials file, in order.
struct Blocks<'a> {
    lines: Vec<&'a str>,
    at: usize,
}

impl<'a> Iterator for Blocks<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        while self.at + 2 < self.lines.len() {
            let (open, value, close) =
                (self.lines[self.at], self.lines[self.at + 1], self.lines[self.at + 2]);
            if is_opening(open) && is_value(value) && is_closing(close) {
                self.at += 3;
                return Some(one_cr_off(value));
            }
            self.at += 1;
        }
        None
    }
}

/// The line before a value: async-nats' `[-]{3,}.*[-]{3,}\r?\n`, which its
/// unanchored pattern matches anywhere in a line: three dashes or more
/// somewhere, three more at the end (one `\r` allowed after them, as
/// `\r?\n`: a line ending `\r\r\n` is none).
fn is_opening(line: &str) -> bool {
    let line = one_cr_off(line);
    line.len() >= 6 && line.ends_with("---") && line[..line.len() - 3].contains("---")
}

/// The line after a value: the same pattern, right after the value's
/// newline, so from the line's first character.
fn is_closing(line: &str) -> bool {
    let line = one_cr_off(line);
    line.len() >= 6 && line.starts_with("---") && line.ends_with("---")
}

/// A line without the one `\r` its pattern allows before the newline.
fn one_cr_off(line: &str) -> &str {
    line.strip_suffix('\r').unwrap_or(line)
}

fn is_value(line: &str) -> bool {
    let line = one_cr_off(line);
    !line.is_empty() && line.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-.=".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::{parse, with_credentials_file, CredsError, MAX_CREDS_BYTES};

    // A user seed made for these tests (nkeys' documentation example).
    const SEED: &str = "SUAIO3FHUX5PNV2LQIIP7TZ3N4L7TX3W53MQGEIVYFIGA635OZCKEYHFLM";

    fn file(jwt: &str, seed: &str, newline: &str) -> String {
        [
            "-----BEGIN NATS USER JWT-----",
            jwt,
            "------END NATS USER JWT------",
            "",
            "************************* IMPORTANT *************************",
            "NKEY Seed printed below can be used to sign and prove identity.",
            "",
            "-----BEGIN USER NKEY SEED-----",
            seed,
            "------END USER NKEY SEED------",
            "",
        ]
        .join(newline)
    }

    #[test]
    fn a_credentials_file_gives_its_jwt_and_seed_as_async_nats_reads_them() {
        let jwt = "eyJ0eXAiOiJKV1QiLCJhbGciOiJlZDI1NTE5LW5rZXkifQ.eyJqdGkiOiJBIn0.c2ln-_=";
        for newline in ["\n", "\r\n"] {
            let text = file(jwt, SEED, newline);
            assert_eq!(parse(&text).unwrap(), (jwt, SEED));
            // The same file through async-nats' own reader (its regex).
            assert!(async_nats::ConnectOptions::with_credentials(&text).is_ok());
        }
        assert!(nkeys::KeyPair::from_seed(SEED).is_ok());
    }

    #[test]
    fn a_file_without_both_blocks_is_refused_without_quoting_it() {
        assert!(matches!(parse(""), Err(CredsError::NoJwt)));
        assert!(matches!(parse("SUAIO3FHUX5\n"), Err(CredsError::NoJwt)));
        let only_jwt = "-----BEGIN NATS USER JWT-----\neyJ0\n------END NATS USER JWT------\n";
        let err = parse(only_jwt).unwrap_err();
        assert!(matches!(err, CredsError::NoSeed));
        assert!(!err.to_string().contains("eyJ0"));
        // A value with other characters (a space) is no block: the seed's
        // block is then the only one, and async-nats refuses it too.
        let spaced = file("eyJ0 x", SEED, "\n");
        assert!(matches!(parse(&spaced), Err(CredsError::NoSeed)));
        assert!(async_nats::ConnectOptions::with_credentials(&spaced).is_err());
        assert!(matches!(parse(&file("eyJ0 x", "SU x", "\n")), Err(CredsError::NoJwt)));
        // Short decorations (fewer than three dashes at each end) are not.
        assert!(matches!(parse("--a--\neyJ0\n--b--\n--c--\nSU\n--d--\n"), Err(CredsError::NoJwt)));
    }

    // Review, session 6: the read was cut at 64 KiB and the cut judged as
    // text ("incomplete utf-8 byte sequence", or "no seed block" for a
    // block past the cut). A file over the limit is refused as such, a
    // file that is not text as such, and neither error quotes the file.
    #[tokio::test]
    async fn an_oversized_or_binary_file_is_refused_for_what_it_is() {
        let dir = tempfile::tempdir().unwrap();
        let jwt = "eyJ0eXAiOiJKV1QiLCJhbGciOiJlZDI1NTE5LW5rZXkifQ.eyJqdGkiOiJBIn0.c2ln";
        let good = file(jwt, SEED, "\n");
        let path = dir.path().join("c.creds");
        std::fs::write(&path, &good).unwrap();
        assert!(with_credentials_file(async_nats::ConnectOptions::new(), &path).await.is_ok());
        // Exactly at the limit: read whole.
        let at_limit = format!("{good}{}", "#".repeat(MAX_CREDS_BYTES as usize - good.len()));
        std::fs::write(&path, &at_limit).unwrap();
        assert!(with_credentials_file(async_nats::ConnectOptions::new(), &path).await.is_ok());
        // One character past it (a multi-byte one, which a cut read splits).
        std::fs::write(&path, format!("{at_limit}é")).unwrap();
        let err = with_credentials_file(async_nats::ConnectOptions::new(), &path).await.unwrap_err();
        assert!(matches!(err, CredsError::TooLarge { .. }), "{err:?}");
        let mut binary = good.clone().into_bytes();
        binary.extend_from_slice(&[0xff, 0xfe, 0x00]);
        std::fs::write(&path, &binary).unwrap();
        let err = with_credentials_file(async_nats::ConnectOptions::new(), &path).await.unwrap_err();
        assert!(matches!(err, CredsError::NotText { .. }), "{err:?}");
        for text in [err.to_string(), format!("{err:?}")] {
            assert!(!text.contains(SEED) && !text.contains(jwt), "{text}");
        }
    }

    // A FIFO at the credentials path blocked the agent's start (opening it
    // waits for a writer); it, a directory and a device file are refused
    // at once. A symlink to a regular file (a mounted secret) still works.
    #[tokio::test]
    async fn a_fifo_a_directory_or_a_device_is_refused_at_once_a_symlink_followed() {
        use rustix::fs::{mknodat, symlink, FileType, Mode, CWD};
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo.creds");
        mknodat(CWD, &fifo, FileType::Fifo, Mode::from_raw_mode(0o600), 0).unwrap();
        let within = std::time::Duration::from_secs(5);
        for path in [fifo.as_path(), dir.path(), std::path::Path::new("/dev/zero")] {
            let read = with_credentials_file(async_nats::ConnectOptions::new(), path);
            let err = tokio::time::timeout(within, read).await.expect("not blocked").unwrap_err();
            assert!(matches!(err, CredsError::NotAFile { .. }), "{}: {err:?}", path.display());
        }
        let real = dir.path().join("real.creds");
        std::fs::write(&real, file("eyJ0eXAiOiJKV1QifQ.e30.c2ln", SEED, "\n")).unwrap();
        let link = dir.path().join("link.creds");
        symlink(&real, &link).unwrap();
        assert!(with_credentials_file(async_nats::ConnectOptions::new(), &link).await.is_ok());
    }

    // Review, session 6: random files built from real and broken lines
    // (CRLF, stray \r, blanks, short and indented decorations): every file
    // async-nats' own parser takes, this one takes too.
    #[test]
    fn every_file_async_nats_takes_this_parser_takes() {
        let jwt = "eyJ0eXAiOiJKV1QiLCJhbGciOiJlZDI1NTE5LW5rZXkifQ.eyJqdGkiOiJBIn0.c2ln";
        let jwt_block = format!("-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------");
        let seed_block =
            format!("-----BEGIN USER NKEY SEED-----\r\n{SEED}\r\n------END USER NKEY SEED------");
        let pieces: &[&str] = &[
            &jwt_block,
            &seed_block,
            &jwt_block,
            &seed_block,
            "-----BEGIN NATS USER JWT-----",
            "------END NATS USER JWT------",
            jwt,
            SEED,
            "-----BEGIN USER NKEY SEED-----",
            "------END USER NKEY SEED------",
            "",
            "  ",
            " -----X-----",
            "---",
            "------",
            "-----\r",
            "# comment",
            "\r",
            "*** IMPORTANT ***",
        ];
        let newlines = ["\n", "\r\n", "\r\r\n"];
        let mut state = 0x1234_5678_u64;
        let mut pick = |n: usize| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % n as u64) as usize
        };
        let (mut taken, mut refused) = (0, Vec::new());
        for _ in 0..5_000 {
            let mut text = String::new();
            for _ in 0..3 + pick(8) {
                text.push_str(pieces[pick(pieces.len())]);
                text.push_str(newlines[pick(newlines.len())]);
            }
            if async_nats::ConnectOptions::with_credentials(&text).is_ok() {
                taken += 1;
                if !parse(&text).is_ok_and(|(_, seed)| nkeys::KeyPair::from_seed(seed).is_ok()) {
                    refused.push(text);
                }
            }
        }
        assert!(taken > 0, "no generated file was a credentials file: the test proves nothing");
        assert!(refused.is_empty(), "{} refused, e.g. {:?}", refused.len(), refused.first());
    }
}
