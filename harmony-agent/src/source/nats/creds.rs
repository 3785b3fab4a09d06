//! Reading a NATS credentials file (a user JWT and its nkey seed) without a regular-expression engine.
//!
//! async-nats reads these files with the `regex` crate, and that call was
//! the agent's only path into it: about 400 KiB of the size-profile binary
//! (`docs/performance.md`). This parser takes what async-nats' pattern
//! takes: a decoration line (three dashes or more at both ends), one line
//! of `[A-Za-z0-9_.=-]`, another decoration line; the first such block is
//! the JWT, the second the seed. The seed is secret: no error or log line
//! carries any part of the file.

use std::path::Path;
use std::sync::Arc;

use async_nats::{AuthError, ConnectOptions};

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
    let read_failed = |source| CredsError::ReadFailed { path: path.display().to_string(), source };
    let file = tokio::fs::File::open(path).await.map_err(read_failed)?;
    let mut contents = String::new();
    tokio::io::AsyncReadExt::read_to_string(
        &mut tokio::io::AsyncReadExt::take(file, MAX_CREDS_BYTES),
        &mut contents,
    )
    .await
    .map_err(read_failed)?;
    let (jwt, seed) = parse(&contents)?;
    let key_pair = Arc::new(nkeys::KeyPair::from_seed(seed).map_err(|_| CredsError::BadSeed)?);
    let jwt = jwt.to_owned();
    Ok(options.jwt(jwt, move |nonce| {
        let key_pair = Arc::clone(&key_pair);
        async move { key_pair.sign(&nonce).map_err(AuthError::new) }
    }))
}

/// The JWT and the seed of a credentials file's text.
fn parse(contents: &str) -> Result<(&str, &str), CredsError> {
    let mut blocks = Blocks { lines: contents.lines().collect(), at: 0 };
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
            if is_decoration(open) && is_value(value) && is_decoration(close) {
                self.at += 3;
                return Some(value.trim_end_matches('\r'));
            }
            self.at += 1;
        }
        None
    }
}

/// `---…---`: three dashes or more at the start and at the end (leading
/// blanks allowed, as async-nats' pattern allows them).
fn is_decoration(line: &str) -> bool {
    let line = line.trim_start().trim_end_matches('\r');
    line.len() >= 6 && line.starts_with("---") && line.ends_with("---")
}

fn is_value(line: &str) -> bool {
    let line = line.trim_end_matches('\r');
    !line.is_empty() && line.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-.=".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::{parse, CredsError};

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
}
