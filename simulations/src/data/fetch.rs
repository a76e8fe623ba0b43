//! Fetching MovieLens-100K: the recbole wheel from PyPI, checked by SHA-256, then unpacked.
//!
//! recbole ships the dataset as `.inter`/`.item`/`.user` files inside its wheel, which makes
//! PyPI (reachable wherever `pip` works) a pinned, checksummed mirror of MovieLens-100K.

use std::fs::{self, File};
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::DataError;

/// The recbole release whose wheel carries the dataset.
pub const RECBOLE_VERSION: &str = "1.2.1";

/// SHA-256 of `recbole-1.2.1-py3-none-any.whl`, lowercase hex.
pub const RECBOLE_WHEEL_SHA256: &str = "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407";

/// The files [`fetch_ml100k`] places in `data_dir/ml-100k/`.
pub const ML100K_FILES: [&str; 3] = [ML100K_INTER, ML100K_ITEM, "ml-100k.user"];

/// The interactions file.
pub(super) const ML100K_INTER: &str = "ml-100k.inter";
/// The item metadata file.
pub(super) const ML100K_ITEM: &str = "ml-100k.item";

/// Where the files sit inside the wheel.
const WHEEL_FOLDER: &str = "recbole/dataset_example/ml-100k/";

/// How much of pip's stderr an error message repeats.
const STDERR_TAIL_CHARS: usize = 600;

/// Downloads recbole==1.2.1, verifies the wheel, extracts ml-100k into `data_dir/ml-100k/`.
///
/// Returns that folder. Does nothing (but return the folder) when the three files of
/// [`ML100K_FILES`] already exist. Needs `python3 -m pip` and access to PyPI (or whatever
/// index pip is configured for); the wheel is downloaded into a scratch folder inside
/// `data_dir`, removed afterwards. Each file is written under a temporary name and then
/// renamed, so an interrupted fetch never leaves a truncated file behind. Progress goes to
/// stderr; nothing is printed to stdout.
pub fn fetch_ml100k(data_dir: &Path) -> Result<PathBuf, DataError> {
    let target = data_dir.join("ml-100k");
    if ML100K_FILES.iter().all(|f| target.join(f).is_file()) {
        return Ok(target);
    }
    fs::create_dir_all(data_dir).map_err(|e| DataError::io(data_dir, e))?;
    let scratch = ScratchDir::create(data_dir.join(format!(".fetch-{}", std::process::id())))?;
    eprintln!("fetching MovieLens-100K from PyPI (recbole=={RECBOLE_VERSION})…");
    let wheel = download_wheel(&scratch.0, &target)?;
    install_from_wheel(&wheel, RECBOLE_WHEEL_SHA256, &target)?;
    eprintln!("MovieLens-100K is in {}", target.display());
    Ok(target)
}

/// A folder removed, with its contents, when dropped.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn create(path: PathBuf) -> Result<Self, DataError> {
        // A leftover from a crashed run that had our process id holds nothing we need.
        if path.exists() {
            fs::remove_dir_all(&path).map_err(|e| DataError::io(&path, e))?;
        }
        fs::create_dir(&path).map_err(|e| DataError::io(&path, e))?;
        Ok(ScratchDir(path))
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        // Best effort: a leftover scratch folder is harmless.
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// What to tell the user when the download cannot happen.
fn fetch_hint(target: &Path) -> String {
    format!(
        "fetching needs python3 with pip and access to PyPI; or place {} in {} yourself",
        ML100K_FILES.join(", "),
        target.display()
    )
}

/// Runs `pip download` for the recbole wheel into `dir` and returns the wheel's path.
fn download_wheel(dir: &Path, target: &Path) -> Result<PathBuf, DataError> {
    let output = Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "--no-input",
            "--only-binary=:all:",
            &format!("recbole=={RECBOLE_VERSION}"),
            "-d",
        ])
        .arg(dir)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| DataError::Fetch(format!("could not run python3 ({e}); {}", fetch_hint(target))))?;
    if !output.status.success() {
        return Err(DataError::Fetch(format!(
            "pip download recbole=={RECBOLE_VERSION} failed ({}): {}; {}",
            output.status,
            stderr_tail(&output.stderr),
            fetch_hint(target)
        )));
    }
    let entries = fs::read_dir(dir).map_err(|e| DataError::io(dir, e))?;
    for entry in entries {
        let path = entry.map_err(|e| DataError::io(dir, e))?.path();
        let is_recbole_wheel = path.extension().is_some_and(|ext| ext == "whl")
            && path.file_name().is_some_and(|name| name.to_string_lossy().starts_with("recbole-"));
        if is_recbole_wheel {
            return Ok(path);
        }
    }
    Err(DataError::Fetch(format!(
        "pip download reported success but left no recbole wheel in {}",
        dir.display()
    )))
}

/// The last lines of a process's stderr, on one line and at most [`STDERR_TAIL_CHARS`] long.
fn stderr_tail(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let lines: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    let joined = lines[lines.len().saturating_sub(5)..].join(" | ");
    let n_chars = joined.chars().count();
    if n_chars <= STDERR_TAIL_CHARS {
        return if joined.is_empty() { "no output".to_owned() } else { joined };
    }
    let tail: String = joined.chars().skip(n_chars - STDERR_TAIL_CHARS).collect();
    format!("…{tail}")
}

/// Checks the wheel's digest, then extracts the dataset files into `target`.
///
/// Nothing is written when the digest does not match.
fn install_from_wheel(wheel: &Path, expected_sha256: &str, target: &Path) -> Result<(), DataError> {
    verify_sha256(wheel, expected_sha256)?;
    extract_ml100k(wheel, target)
}

/// Checks that the file at `path` has the SHA-256 digest `expected_hex`.
fn verify_sha256(path: &Path, expected_hex: &str) -> Result<(), DataError> {
    let mut file = File::open(path).map_err(|e| DataError::io(path, e))?;
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(DataError::io(path, e)),
        };
        context.update(&buf[..n]);
    }
    let actual: String = context.finish().as_ref().iter().map(|b| format!("{b:02x}")).collect();
    let expected = expected_hex.trim().to_ascii_lowercase();
    if actual == expected {
        Ok(())
    } else {
        Err(DataError::Checksum { path: path.to_owned(), expected, actual })
    }
}

/// Extracts the files of [`ML100K_FILES`] from the wheel into `target`.
fn extract_ml100k(wheel: &Path, target: &Path) -> Result<(), DataError> {
    let file = File::open(wheel).map_err(|e| DataError::io(wheel, e))?;
    let mut archive = zip::ZipArchive::new(BufReader::new(file))
        .map_err(|e| DataError::Fetch(format!("{}: not a readable wheel: {e}", wheel.display())))?;
    fs::create_dir_all(target).map_err(|e| DataError::io(target, e))?;
    for name in ML100K_FILES {
        let mut entry = archive.by_name(&format!("{WHEEL_FOLDER}{name}")).map_err(|e| {
            DataError::Fetch(format!("{}: cannot open {WHEEL_FOLDER}{name}: {e}", wheel.display()))
        })?;
        let partial = target.join(format!(".{name}.part-{}", std::process::id()));
        let written = File::create(&partial).and_then(|mut out| {
            io::copy(&mut entry, &mut out)?;
            out.sync_all()
        });
        if let Err(e) = written {
            let _ = fs::remove_file(&partial);
            return Err(DataError::Fetch(format!(
                "cannot extract {name} from {} into {}: {e}",
                wheel.display(),
                target.display()
            )));
        }
        let final_path = target.join(name);
        fs::rename(&partial, &final_path).map_err(|e| {
            let _ = fs::remove_file(&partial);
            DataError::io(final_path, e)
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;
    use crate::data::{DataSource, load, load_item_genres};

    const INTER: &[u8] = b"user_id:token\titem_id:token\trating:float\ttimestamp:float\n\
        196\t242\t3\t881250949\n186\t302\t3\t891717742\n";
    const ITEM: &[u8] = b"item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n\
        242\tKolya\t1996\tComedy\n";
    const USER: &[u8] = b"user_id:token\tage:token\n196\t49\n";

    /// A wheel-shaped zip holding `entries`, deflated as real wheels are.
    fn fake_wheel(dir: &Path, entries: &[(&str, &[u8])]) -> PathBuf {
        let path = dir.join("recbole-1.2.1-py3-none-any.whl");
        let mut zip = zip::ZipWriter::new(File::create(&path).expect("create wheel"));
        let options =
            zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
        for (name, contents) in entries {
            zip.start_file(*name, options).expect("start entry");
            zip.write_all(contents).expect("write entry");
        }
        zip.finish().expect("finish wheel");
        path
    }

    fn sha256_hex(bytes: &[u8]) -> String {
        ring::digest::digest(&ring::digest::SHA256, bytes)
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    fn full_wheel(dir: &Path) -> PathBuf {
        fake_wheel(
            dir,
            &[
                ("recbole/__init__.py", b""),
                ("recbole/dataset_example/ml-100k/ml-100k.inter", INTER),
                ("recbole/dataset_example/ml-100k/ml-100k.item", ITEM),
                ("recbole/dataset_example/ml-100k/ml-100k.kg", b"ignored"),
                ("recbole/dataset_example/ml-100k/ml-100k.user", USER),
            ],
        )
    }

    #[test]
    fn sha256_verification_accepts_the_right_digest_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("hello.txt");
        fs::write(&path, b"hello").expect("write");
        let hello = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";
        verify_sha256(&path, hello).expect("matches");
        verify_sha256(&path, &hello.to_ascii_uppercase()).expect("case does not matter");
        let err = verify_sha256(&path, RECBOLE_WHEEL_SHA256).expect_err("mismatch");
        match &err {
            DataError::Checksum { path: p, expected, actual } => {
                assert_eq!(p, &path);
                assert_eq!(expected, RECBOLE_WHEEL_SHA256);
                assert_eq!(actual, hello);
            }
            other => panic!("expected Checksum, got {other:?}"),
        }
        assert!(err.to_string().contains("hello.txt"));
        let missing = dir.path().join("missing.whl");
        assert!(matches!(
            verify_sha256(&missing, hello),
            Err(DataError::Io { path, .. }) if path == missing
        ));
    }

    #[test]
    fn a_verified_wheel_is_extracted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let wheel = full_wheel(dir.path());
        let digest = sha256_hex(&fs::read(&wheel).expect("read wheel"));
        let data_dir = dir.path().join("data");
        let target = data_dir.join("ml-100k");
        install_from_wheel(&wheel, &digest, &target).expect("installs");
        assert_eq!(fs::read(target.join("ml-100k.inter")).expect("inter"), INTER);
        assert_eq!(fs::read(target.join("ml-100k.item")).expect("item"), ITEM);
        assert_eq!(fs::read(target.join("ml-100k.user")).expect("user"), USER);
        let mut names: Vec<_> =
            fs::read_dir(&target).expect("list").map(|e| e.expect("entry").file_name()).collect();
        names.sort();
        assert_eq!(names, ML100K_FILES.map(std::ffi::OsString::from), "no leftovers");

        // Now present, so fetching is a no-op and loading reads the files.
        assert_eq!(fetch_ml100k(&data_dir).expect("no-op"), target);
        let ds = load(&DataSource::MovieLens100k { data_dir: data_dir.clone() }).expect("loads");
        assert_eq!(ds.name, "ml-100k");
        assert_eq!((ds.interactions.len(), ds.n_users(), ds.n_items()), (2, 2, 2));
        let genres = load_item_genres(&data_dir, &ds.item_ids).expect("genres");
        assert_eq!(genres, [vec!["Comedy".to_owned()], vec![]]);
    }

    #[test]
    fn a_wheel_with_the_wrong_digest_extracts_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let wheel = full_wheel(dir.path());
        let target = dir.path().join("ml-100k");
        let err = install_from_wheel(&wheel, RECBOLE_WHEEL_SHA256, &target).expect_err("mismatch");
        assert!(matches!(err, DataError::Checksum { .. }), "{err:?}");
        assert!(!target.exists());
    }

    #[test]
    fn a_wheel_without_the_dataset_is_a_fetch_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let wheel = fake_wheel(dir.path(), &[("recbole/dataset_example/ml-100k/ml-100k.inter", INTER)]);
        let target = dir.path().join("ml-100k");
        let err = extract_ml100k(&wheel, &target).expect_err("incomplete");
        assert!(matches!(&err, DataError::Fetch(m) if m.contains("ml-100k.item")), "{err:?}");
        // The complete file stays; no partial file is left; fetch would retry.
        assert!(target.join("ml-100k.inter").is_file());
        assert_eq!(fs::read_dir(&target).expect("list").count(), 1);

        let not_zip = dir.path().join("not.whl");
        fs::write(&not_zip, b"nope").expect("write");
        assert!(matches!(extract_ml100k(&not_zip, &target), Err(DataError::Fetch(_))));
    }

    #[test]
    fn stderr_tail_keeps_the_last_lines_short() {
        assert_eq!(stderr_tail(b""), "no output");
        let lines: String = (0..10).map(|i| format!("line {i}\n\n")).collect();
        assert_eq!(stderr_tail(lines.as_bytes()), "line 5 | line 6 | line 7 | line 8 | line 9");
        let long = "x".repeat(5_000);
        assert_eq!(stderr_tail(long.as_bytes()).chars().count(), STDERR_TAIL_CHARS + 1);
    }

    /// Downloads the real wheel; runs only with `FEDREC_NET_TESTS=1`.
    #[test]
    fn fetch_real_ml100k_from_pypi() {
        if std::env::var_os("FEDREC_NET_TESTS").is_none_or(|v| v != "1") {
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let target = fetch_ml100k(dir.path()).expect("fetches");
        assert!(ML100K_FILES.iter().all(|f| target.join(f).is_file()));
        let leftovers: Vec<_> =
            fs::read_dir(dir.path()).expect("list").map(|e| e.expect("entry").file_name()).collect();
        assert_eq!(leftovers, ["ml-100k"], "scratch folder removed");
        let ds = load(&DataSource::MovieLens100k { data_dir: dir.path().to_owned() }).expect("loads");
        eprintln!(
            "ml-100k: {} interactions, {} users, {} items",
            ds.interactions.len(),
            ds.n_users(),
            ds.n_items()
        );
        assert_eq!((ds.interactions.len(), ds.n_users(), ds.n_items()), (100_000, 943, 1_682));
        let genres = load_item_genres(dir.path(), &ds.item_ids).expect("genres");
        assert!(genres.iter().all(|g| !g.is_empty()));
    }
}
