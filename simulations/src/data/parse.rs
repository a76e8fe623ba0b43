//! Reading rating files: format detection, field parsing, dense id assignment and de-duplication.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::ops::Range;
use std::path::{Path, PathBuf};

use super::split::positions_by_user;
use super::{DataError, Dataset, Interaction, Split, fetch, name_from_path};

/// How many characters of a field an error message may quote.
const MAX_QUOTED_CHARS: usize = 32;

/// The field layouts we recognise.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    /// `user::item::rating::timestamp`, MovieLens 1M/10M.
    DoubleColon,
    /// Tab-separated, MovieLens-100K `u.data`, recbole `.inter`, generic TSV.
    Tsv,
    /// Comma-separated, MovieLens 20M/25M.
    Csv,
}

impl Format {
    /// Whether the first record may be a header (recognised by a non-numeric rating).
    fn may_have_header(self) -> bool {
        matches!(self, Format::Tsv | Format::Csv)
    }
}

/// The fields of one record: byte ranges into a shared buffer.
#[derive(Clone, Copy)]
struct Fields<'a> {
    buf: &'a [u8],
    ranges: &'a [Range<usize>],
}

impl<'a> Fields<'a> {
    fn len(&self) -> usize {
        self.ranges.len()
    }

    /// Field `i`, with surrounding ASCII whitespace removed.
    fn get(&self, i: usize) -> Option<&'a [u8]> {
        let range = self.ranges.get(i)?;
        self.buf.get(range.clone()).map(<[u8]>::trim_ascii)
    }

    /// A line holding nothing but whitespace.
    fn is_blank(&self) -> bool {
        self.len() == 0 || (self.len() == 1 && self.get(0).is_none_or(<[u8]>::is_empty))
    }
}

/// Decodes a field: UTF-8 when it is valid UTF-8, Latin-1 otherwise.
///
/// The original MovieLens files are Latin-1 while recbole's copies are UTF-8; deciding per
/// field reads both right and never fails.
fn decode(bytes: &[u8]) -> Cow<'_, str> {
    match std::str::from_utf8(bytes) {
        Ok(s) => Cow::Borrowed(s),
        Err(_) => Cow::Owned(bytes.iter().copied().map(char::from).collect()),
    }
}

/// Shortens a piece of data for an error message.
pub(super) fn truncate_for_message(s: &str) -> String {
    match s.char_indices().nth(MAX_QUOTED_CHARS) {
        Some((cut, _)) => format!("{}…", &s[..cut]),
        None => s.to_owned(),
    }
}

/// A field quoted for an error message: decoded, truncated and escaped.
fn quote(bytes: &[u8]) -> String {
    format!("{:?}", truncate_for_message(&decode(bytes)))
}

fn open(path: &Path) -> Result<BufReader<File>, DataError> {
    File::open(path).map(BufReader::new).map_err(|e| DataError::io(path, e))
}

/// Finds the format from the first non-blank line, then rewinds the reader.
///
/// Returns `None` for a file without any non-blank line.
fn detect_format(path: &Path, reader: &mut BufReader<File>) -> Result<Option<Format>, DataError> {
    let mut line = Vec::new();
    let mut line_no = 0;
    let format = loop {
        line.clear();
        let n = reader.read_until(b'\n', &mut line).map_err(|e| DataError::io(path, e))?;
        if n == 0 {
            break None;
        }
        line_no += 1;
        let text = line.trim_ascii();
        if text.is_empty() {
            continue;
        }
        if text.windows(2).any(|w| w == b"::") {
            break Some(Format::DoubleColon);
        } else if text.contains(&b'\t') {
            break Some(Format::Tsv);
        } else if text.contains(&b',') {
            break Some(Format::Csv);
        }
        return Err(DataError::Malformed {
            path: path.to_owned(),
            line: line_no,
            reason: "unrecognised format: expected fields separated by tabs, commas or \"::\"".to_owned(),
        });
    };
    reader.seek(SeekFrom::Start(0)).map_err(|e| DataError::io(path, e))?;
    Ok(format)
}

/// Calls `sink(format, line, fields)` for every non-blank record of the file, in order.
///
/// `format` is detected from the file when `None`. Returns the format used, or `None` when the
/// file has no non-blank line.
fn read_records(
    path: &Path,
    format: Option<Format>,
    mut sink: impl FnMut(Format, usize, Fields<'_>) -> Result<(), DataError>,
) -> Result<Option<Format>, DataError> {
    let mut reader = open(path)?;
    let Some(format) = (match format {
        Some(f) => Some(f),
        None => detect_format(path, &mut reader)?,
    }) else {
        return Ok(None);
    };
    let mut ranges = Vec::new();
    match format {
        Format::DoubleColon => {
            let mut buf = Vec::new();
            let mut line = 0;
            loop {
                buf.clear();
                let n = reader.read_until(b'\n', &mut buf).map_err(|e| DataError::io(path, e))?;
                if n == 0 {
                    break;
                }
                line += 1;
                let content = buf.strip_suffix(b"\n").unwrap_or(&buf);
                let content = content.strip_suffix(b"\r").unwrap_or(content);
                split_double_colon(content, &mut ranges);
                let fields = Fields { buf: content, ranges: &ranges };
                if !fields.is_blank() {
                    sink(format, line, fields)?;
                }
            }
        }
        Format::Tsv | Format::Csv => {
            let (delimiter, quoting) = match format {
                Format::Csv => (b',', true),
                // Titles in tab-separated files carry stray quotes; TSV has no quoting anyway.
                _ => (b'\t', false),
            };
            let mut csv_reader = csv::ReaderBuilder::new()
                .delimiter(delimiter)
                .quoting(quoting)
                .has_headers(false)
                .flexible(true)
                .from_reader(LineTracker::new(reader));
            let mut record = csv::ByteRecord::new();
            loop {
                match csv_reader.read_byte_record(&mut record) {
                    Ok(true) => {}
                    Ok(false) => break,
                    Err(e) => return Err(csv_error(path, e)),
                }
                let end = csv_reader.position().byte();
                let line = csv_reader.get_mut().record_line(end);
                ranges.clear();
                ranges.extend((0..record.len()).filter_map(|i| record.range(i)));
                let fields = Fields { buf: record.as_slice(), ranges: &ranges };
                if !fields.is_blank() {
                    sink(format, line, fields)?;
                }
            }
        }
    }
    Ok(Some(format))
}

/// Passes input through to the csv parser, keeping the bytes of the record being parsed so
/// that records get the line where their content starts.
///
/// The csv crate skips empty lines silently and reports a record's position as where those
/// empty lines began, so its line numbers can point above the record.
struct LineTracker<R> {
    inner: R,
    /// Bytes handed to the parser; `window[head..]` starts at the current record's span.
    window: Vec<u8>,
    head: usize,
    /// Input offset of `window[head]`.
    head_offset: u64,
    /// Line number (1-based) of `window[head]`.
    head_line: u64,
}

impl<R> LineTracker<R> {
    /// Compact the window once this many bytes are consumed.
    const COMPACT_AT: usize = 1 << 16;

    fn new(inner: R) -> Self {
        LineTracker { inner, window: Vec::new(), head: 0, head_offset: 0, head_line: 1 }
    }

    /// The 1-based line where the record that ends at input offset `end` begins.
    ///
    /// Must be called once per record, in order: a record's span starts where the previous
    /// one ended, with the empty lines the parser skipped before its content.
    fn record_line(&mut self, end: u64) -> usize {
        let len = usize::try_from(end.saturating_sub(self.head_offset))
            .unwrap_or(usize::MAX)
            .min(self.window.len() - self.head);
        let span = &self.window[self.head..self.head + len];
        let count_newlines = |bytes: &[u8]| bytes.iter().filter(|&&b| b == b'\n').count() as u64;
        let leading = span.iter().take_while(|&&b| b == b'\n' || b == b'\r').count();
        let line = self.head_line + count_newlines(&span[..leading]);
        self.head_line += count_newlines(span);
        self.head += len;
        self.head_offset += len as u64;
        if self.head >= Self::COMPACT_AT {
            self.window.drain(..self.head);
            self.head = 0;
        }
        usize::try_from(line).unwrap_or(usize::MAX)
    }
}

impl<R: Read> Read for LineTracker<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.window.extend_from_slice(&buf[..n]);
        Ok(n)
    }
}

/// Splits `line` on `::` into byte ranges.
fn split_double_colon(line: &[u8], ranges: &mut Vec<Range<usize>>) {
    ranges.clear();
    let mut start = 0;
    let mut i = 0;
    while i + 1 < line.len() {
        if line[i] == b':' && line[i + 1] == b':' {
            ranges.push(start..i);
            i += 2;
            start = i;
        } else {
            i += 1;
        }
    }
    ranges.push(start..line.len());
}

fn csv_error(path: &Path, error: csv::Error) -> DataError {
    let line = error.position().map_or(0, |p| usize::try_from(p.line()).unwrap_or(usize::MAX));
    match error.into_kind() {
        csv::ErrorKind::Io(e) => DataError::io(path, e),
        other => DataError::Malformed { path: path.to_owned(), line, reason: format!("{:?}", other) },
    }
}

/// Maps original ids to dense indices in order of first appearance.
#[derive(Default)]
struct Interner {
    /// Ids written as canonical decimal numbers, the usual case, keyed without a heap string
    /// to look at: loading is dominated by these lookups.
    numeric: HashMap<u64, u32>,
    /// All other ids.
    index: HashMap<String, u32>,
    ids: Vec<String>,
    /// The raw bytes and index of the last id seen: rating files are often grouped by user,
    /// and skipping the hash lookup then saves most of the loading time.
    last: Option<(Vec<u8>, u32)>,
}

impl Interner {
    /// The index of `raw`, assigning the next one when it is new; `None` past `u32::MAX` ids.
    fn intern(&mut self, raw: &[u8]) -> Option<u32> {
        if let Some((last_raw, idx)) = &self.last
            && last_raw == raw
        {
            return Some(*idx);
        }
        let next = u32::try_from(self.ids.len()).ok();
        let idx = if let Some(number) = canonical_number(raw) {
            match self.numeric.get(&number) {
                Some(&idx) => idx,
                None => {
                    let idx = next?;
                    self.numeric.insert(number, idx);
                    self.ids.push(number.to_string());
                    idx
                }
            }
        } else {
            let id = decode(raw);
            match self.index.get(id.as_ref()) {
                Some(&idx) => idx,
                None => {
                    let idx = next?;
                    let id = id.into_owned();
                    self.index.insert(id.clone(), idx);
                    self.ids.push(id);
                    idx
                }
            }
        };
        let (last_raw, last_idx) = self.last.get_or_insert_with(Default::default);
        last_raw.clear();
        last_raw.extend_from_slice(raw);
        *last_idx = idx;
        Some(idx)
    }
}

/// The value of `raw` when it is a decimal number written the one way `u64::to_string` writes
/// it (no sign, no leading zero), so that the number stands for the id without ambiguity.
fn canonical_number(raw: &[u8]) -> Option<u64> {
    match raw {
        [] | [b'0', _, ..] => None,
        _ if raw.len() > 19 || !raw.iter().all(u8::is_ascii_digit) => None,
        // At most 19 digits always fit in a u64.
        _ => Some(raw.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0'))),
    }
}

/// The id spaces being built while reading one or more files.
#[derive(Default)]
struct IdSpace {
    users: Interner,
    items: Interner,
}

/// Reads every interaction of a ratings file into `ids`' index space, without duplicates.
fn read_interactions(path: &Path, ids: &mut IdSpace) -> Result<Vec<Interaction>, DataError> {
    let mut interactions = Vec::new();
    let mut first = true;
    read_records(path, None, |format, line, fields| {
        let malformed = |reason: String| DataError::Malformed { path: path.to_owned(), line, reason };
        let is_first = std::mem::replace(&mut first, false);
        if fields.len() < 3 {
            return Err(malformed(format!(
                "expected at least 3 fields (user, item, rating), found {}",
                fields.len()
            )));
        }
        let [Some(user), Some(item), Some(rating)] = [0, 1, 2].map(|i| fields.get(i)) else {
            return Err(malformed("missing field".to_owned()));
        };
        let rating_value = std::str::from_utf8(rating).ok().and_then(|s| s.parse::<f32>().ok());
        let rating = match rating_value {
            Some(r) if r.is_finite() => r,
            Some(_) => return Err(malformed(format!("rating {} is not finite", quote(rating)))),
            None if is_first && format.may_have_header() => return Ok(()),
            None => return Err(malformed(format!("rating {} is not a number", quote(rating)))),
        };
        let timestamp = match fields.get(3) {
            None | Some([]) => None,
            Some(t) => match std::str::from_utf8(t).ok().and_then(|s| s.parse::<i64>().ok()) {
                Some(t) => Some(t),
                None => {
                    return Err(malformed(format!("timestamp {} is not an integer", quote(t))));
                }
            },
        };
        if user.is_empty() {
            return Err(malformed("empty user id".to_owned()));
        }
        if item.is_empty() {
            return Err(malformed("empty item id".to_owned()));
        }
        let user =
            ids.users.intern(user).ok_or_else(|| malformed("more than 2^32 distinct users".to_owned()))?;
        let item =
            ids.items.intern(item).ok_or_else(|| malformed("more than 2^32 distinct items".to_owned()))?;
        interactions.push(Interaction { user, item, rating, timestamp });
        Ok(())
    })?;
    if interactions.is_empty() {
        return Err(DataError::Empty { path: path.to_owned() });
    }
    Ok(dedupe_keep_last(interactions, ids.users.ids.len()))
}

/// Drops every (user, item) pair but its last occurrence, keeping the order of the rest.
fn dedupe_keep_last(interactions: Vec<Interaction>, n_users: usize) -> Vec<Interaction> {
    let mut keep = vec![true; interactions.len()];
    let mut any_duplicate = false;
    let mut by_item = Vec::new();
    for positions in positions_by_user(&interactions, n_users) {
        by_item.clear();
        by_item.extend(positions.iter().map(|&p| (interactions[p].item, p)));
        by_item.sort_unstable();
        for pair in by_item.windows(2) {
            if pair[0].0 == pair[1].0 {
                keep[pair[0].1] = false;
                any_duplicate = true;
            }
        }
    }
    if !any_duplicate {
        return interactions;
    }
    interactions.into_iter().zip(keep).filter_map(|(x, kept)| kept.then_some(x)).collect()
}

/// Loads one ratings file in any supported format; see [`super::load`] for the rules.
pub(super) fn load_file(path: &Path) -> Result<Dataset, DataError> {
    let mut ids = IdSpace::default();
    let interactions = read_interactions(path, &mut ids)?;
    Ok(Dataset { name: name_from_path(path), user_ids: ids.users.ids, item_ids: ids.items.ids, interactions })
}

/// Loads explicit train and test files into one id space (train first, then test).
pub(super) fn load_train_test(train: &Path, test: &Path) -> Result<Split, DataError> {
    let mut ids = IdSpace::default();
    let mut train_set = read_interactions(train, &mut ids)?;
    let mut test_set = read_interactions(test, &mut ids)?;
    // Same order as `split` produces: by user, then file order.
    train_set.sort_by_key(|x| x.user);
    test_set.sort_by_key(|x| x.user);
    Ok(Split {
        name: name_from_path(train),
        user_ids: ids.users.ids,
        item_ids: ids.items.ids,
        train: train_set,
        test: test_set,
    })
}

/// Reads the genres of MovieLens-100K items from `data_dir/ml-100k/ml-100k.item`.
///
/// The file is recbole's: tab-separated with a header naming `item_id:token` and
/// `class:token_seq` columns, genres separated by spaces. The result is aligned to
/// `ds_item_ids`; an item missing from the file gets no genres. Call it after
/// [`super::fetch_ml100k`] (or [`super::load`]) so the file exists.
pub fn load_item_genres(data_dir: &Path, ds_item_ids: &[String]) -> Result<Vec<Vec<String>>, DataError> {
    let path: PathBuf = data_dir.join("ml-100k").join(fetch::ML100K_ITEM);
    let mut columns: Option<(usize, usize)> = None;
    let mut genres: HashMap<String, Vec<String>> = HashMap::new();
    read_records(&path, Some(Format::Tsv), |_, line, fields| {
        let malformed = |reason: String| DataError::Malformed { path: path.clone(), line, reason };
        let Some((id_col, class_col)) = columns else {
            let column = |prefix: &str| {
                (0..fields.len()).find(|&i| fields.get(i).is_some_and(|f| f.starts_with(prefix.as_bytes())))
            };
            let (Some(id_col), Some(class_col)) = (column("item_id:"), column("class:")) else {
                return Err(malformed("expected a header naming the item_id: and class: columns".to_owned()));
            };
            columns = Some((id_col, class_col));
            return Ok(());
        };
        let id = match fields.get(id_col) {
            Some(id) if !id.is_empty() => decode(id).into_owned(),
            _ => return Err(malformed("missing item id".to_owned())),
        };
        let classes = fields
            .get(class_col)
            .map(|c| decode(c).split_ascii_whitespace().map(str::to_owned).collect())
            .unwrap_or_default();
        genres.insert(id, classes);
        Ok(())
    })?;
    Ok(ds_item_ids.iter().map(|id| genres.get(id).cloned().unwrap_or_default()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{DataSource, SplitKind, load, load_split};

    /// Writes `contents` to `name` inside `dir` and returns its path.
    fn write(dir: &tempfile::TempDir, name: &str, contents: &[u8]) -> PathBuf {
        let path = dir.path().join(name);
        std::fs::write(&path, contents).expect("write test file");
        path
    }

    fn at(user: u32, item: u32, rating: f32, timestamp: Option<i64>) -> Interaction {
        Interaction { user, item, rating, timestamp }
    }

    /// The error of loading a file that must not load.
    fn load_err(contents: &[u8]) -> (PathBuf, DataError) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write(&dir, "bad.txt", contents);
        let err = load_file(&path).expect_err("file should not load");
        (path, err)
    }

    /// The line number of a `Malformed` error, checking it names `path`.
    fn malformed_line(path: &Path, err: &DataError) -> usize {
        match err {
            DataError::Malformed { path: p, line, .. } => {
                assert_eq!(p, path);
                assert!(err.to_string().starts_with(&format!("{}:{line}: ", path.display())));
                *line
            }
            other => panic!("expected Malformed, got {other:?}"),
        }
    }

    #[test]
    fn movielens_100k_u_data_parses() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write(&dir, "u.data", b"196\t242\t3\t881250949\n186\t302\t3\t891717742\n196\t302\t4\t1\n");
        let ds = load_file(&path).expect("loads");
        assert_eq!(ds.name, "u");
        assert_eq!(ds.user_ids, ["196", "186"]);
        assert_eq!(ds.item_ids, ["242", "302"]);
        assert_eq!(
            ds.interactions,
            [at(0, 0, 3.0, Some(881_250_949)), at(1, 1, 3.0, Some(891_717_742)), at(0, 1, 4.0, Some(1)),]
        );
        assert_eq!((ds.n_users(), ds.n_items()), (2, 2));
    }

    #[test]
    fn recbole_inter_header_blank_lines_and_crlf() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write(
            &dir,
            "ml-100k.inter",
            b"\nuser_id:token\titem_id:token\trating:float\ttimestamp:float\r\n\
              196\t242\t3\t881250949\r\n\r\n   \n22\t377\t1\t878887116\r\n",
        );
        let ds = load_file(&path).expect("loads");
        assert_eq!(ds.user_ids, ["196", "22"]);
        assert_eq!(ds.item_ids, ["242", "377"]);
        assert_eq!(ds.interactions, [at(0, 0, 3.0, Some(881_250_949)), at(1, 1, 1.0, Some(878_887_116))]);
    }

    #[test]
    fn movielens_1m_dat_parses() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path =
            write(&dir, "ratings.dat", b"1::1193::5::978300760\r\n1::661::3::978302109\n\n2::1193::4::1");
        let ds = load_file(&path).expect("loads");
        assert_eq!(ds.user_ids, ["1", "2"]);
        assert_eq!(ds.item_ids, ["1193", "661"]);
        assert_eq!(
            ds.interactions,
            [at(0, 0, 5.0, Some(978_300_760)), at(0, 1, 3.0, Some(978_302_109)), at(1, 0, 4.0, Some(1)),]
        );
    }

    #[test]
    fn movielens_20m_csv_with_header_parses() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write(
            &dir,
            "ratings.csv",
            b"userId,movieId,rating,timestamp\n1,296,5.0,1147880044\n1,306,3.5,1147868817\n\"7,b\",296,0.5,3\n",
        );
        let ds = load_file(&path).expect("loads");
        assert_eq!(ds.user_ids, ["1", "7,b"]);
        assert_eq!(ds.item_ids, ["296", "306"]);
        assert_eq!(
            ds.interactions,
            [at(0, 0, 5.0, Some(1_147_880_044)), at(0, 1, 3.5, Some(1_147_868_817)), at(1, 0, 0.5, Some(3)),]
        );
    }

    #[test]
    fn generic_tsv_string_ids_without_timestamps_and_extra_columns() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write(
            &dir,
            "likes.tsv",
            b"alice\tthe matrix\t4.5\n bob \tthe matrix\t2\t\textra\tcolumns\ncarol\t\"quoted\t1\t7\tmore\n",
        );
        let ds = load_file(&path).expect("loads");
        assert_eq!(ds.user_ids, ["alice", "bob", "carol"]);
        assert_eq!(ds.item_ids, ["the matrix", "\"quoted"]);
        assert_eq!(ds.interactions, [at(0, 0, 4.5, None), at(1, 0, 2.0, None), at(2, 1, 1.0, Some(7))]);
    }

    #[test]
    fn latin1_and_utf8_ids_both_decode() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write(&dir, "names.tsv", b"Ren\xe9\tMis\xe9rables\t5\nZo\xc3\xab\tMis\xe9rables\t4\n");
        let ds = load_file(&path).expect("loads");
        assert_eq!(ds.user_ids, ["René", "Zoë"]);
        assert_eq!(ds.item_ids, ["Misérables"]);
    }

    #[test]
    fn malformed_lines_name_the_file_and_line() {
        // A bad rating after a good first line is not a header.
        let (path, err) = load_err(b"u\ti\t5\t1\n\nu\ti2\tx\t2\n");
        assert_eq!(malformed_line(&path, &err), 3);
        // Too few fields.
        let (path, err) = load_err(b"u\ti\t5\nu\ti2\n");
        assert_eq!(malformed_line(&path, &err), 2);
        // Ratings must be finite.
        let (path, err) = load_err(b"u\ti\t5\nu\tj\tNaN\n");
        assert_eq!(malformed_line(&path, &err), 2);
        let (path, err) = load_err(b"u,i,inf\n");
        assert_eq!(malformed_line(&path, &err), 1);
        // Timestamps must be integers.
        let (path, err) = load_err(b"user,item,rating,time\n\nu,i,5,1.5\n");
        assert_eq!(malformed_line(&path, &err), 3);
        // `::` files have no header.
        let (path, err) = load_err(b"user::item::rating::time\n1::2::3::4\n");
        assert_eq!(malformed_line(&path, &err), 1);
        let (path, err) = load_err(b"1::2::3::4\n1::2\n");
        assert_eq!(malformed_line(&path, &err), 2);
        // Empty ids.
        let (path, err) = load_err(b"u\ti\t5\n\t\t3\n");
        assert_eq!(malformed_line(&path, &err), 2);
        // No separator we know.
        let (path, err) = load_err(b"\n\njust words\n");
        assert_eq!(malformed_line(&path, &err), 3);
    }

    #[test]
    fn line_numbers_count_blank_lines_crlf_and_quoted_newlines() {
        let (path, err) =
            load_err(b"userId,movieId,rating\r\n\r\n\r\n1,\"multi\nline\",4\r\n  \r\n2,x,bad\r\n");
        assert_eq!(malformed_line(&path, &err), 7);
        let (path, err) = load_err(b"\r\n\r\nu\ti\t4\r\n\r\n\r\nu\tj\t\r\n");
        assert_eq!(malformed_line(&path, &err), 6);
    }

    #[test]
    fn line_numbers_stay_right_in_long_files() {
        let mut contents = String::new();
        let mut line = 0;
        for i in 0..30_000 {
            contents.push_str(&format!("user{}\titem{i}\t{}\t{i}\n", i % 97, i % 5 + 1));
            line += 1;
            if i % 7 == 0 {
                contents.push('\n');
                line += 1;
            }
        }
        contents.push_str("\n\nuser1\titem1\t3\tsoon\n");
        let (path, err) = load_err(contents.as_bytes());
        assert_eq!(malformed_line(&path, &err), line + 3);
    }

    #[test]
    fn error_messages_quote_only_a_short_field() {
        let long = "9".repeat(30) + &"x".repeat(200);
        let (_, err) = load_err(format!("u\ti\t5\nu\ti\t{long}\n").as_bytes());
        let DataError::Malformed { reason, .. } = &err else {
            panic!("expected Malformed, got {err:?}");
        };
        assert!(reason.contains("is not a number"), "{reason}");
        assert!(reason.len() < 80, "{reason}");
    }

    #[test]
    fn files_without_interactions_are_empty() {
        for contents in [&b""[..], b"\n \n\r\n", b"user_id:token\titem_id:token\trating:float\n"] {
            let (path, err) = load_err(contents);
            assert!(matches!(&err, DataError::Empty { path: p } if *p == path), "{err:?}");
            assert!(err.to_string().contains(&path.display().to_string()));
        }
    }

    #[test]
    fn missing_file_is_io_with_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("nope.tsv");
        let err = load(&DataSource::Ratings(path.clone())).expect_err("missing");
        assert!(matches!(&err, DataError::Io { path: p, .. } if *p == path), "{err:?}");
        assert!(err.to_string().contains("nope.tsv"));
    }

    #[test]
    fn duplicate_pairs_keep_the_last_occurrence() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write(&dir, "dups.tsv", b"a\tx\t1\t10\nb\ty\t2\t20\na\tx\t5\t30\nb\tx\t3\t40\n");
        let ds = load_file(&path).expect("loads");
        assert_eq!(ds.user_ids, ["a", "b"]);
        assert_eq!(ds.item_ids, ["x", "y"]);
        assert_eq!(
            ds.interactions,
            [at(1, 1, 2.0, Some(20)), at(0, 0, 5.0, Some(30)), at(1, 0, 3.0, Some(40))]
        );
    }

    #[test]
    fn train_test_files_share_one_index_space() {
        let dir = tempfile::tempdir().expect("tempdir");
        let train = write(&dir, "u1.base", b"a\tx\t1\nb\ty\t2\na\ty\t3\n");
        let test = write(&dir, "u1.test", b"c\tz\t3\nb\tx\t4\n");
        let source = DataSource::TrainTest { train, test };
        let s = load_split(&source, 0.5, SplitKind::Random, 9).expect("loads");
        assert_eq!(s.name, "u1");
        assert_eq!(s.user_ids, ["a", "b", "c"]);
        assert_eq!(s.item_ids, ["x", "y", "z"]);
        assert_eq!(s.train, [at(0, 0, 1.0, None), at(0, 1, 3.0, None), at(1, 1, 2.0, None)]);
        assert_eq!(s.test, [at(1, 0, 4.0, None), at(2, 2, 3.0, None)]);
        assert_eq!((s.n_users(), s.n_items()), (3, 3));
    }

    #[test]
    fn train_test_errors_name_the_failing_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let train = write(&dir, "train.tsv", b"a\tx\t1\n");
        let test = write(&dir, "test.tsv", b"");
        let source = DataSource::TrainTest { train, test: test.clone() };
        let err = load_split(&source, 0.2, SplitKind::Random, 0).expect_err("empty test");
        assert!(matches!(&err, DataError::Empty { path } if *path == test), "{err:?}");
    }

    #[test]
    fn load_split_splits_a_ratings_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut contents = String::new();
        for user in 0..4 {
            for item in 0..5 {
                contents.push_str(&format!("{user},{item},{},{}\n", item % 5 + 1, 100 + item));
            }
        }
        let path = write(&dir, "r.csv", contents.as_bytes());
        let s = load_split(&DataSource::Ratings(path), 0.4, SplitKind::Temporal, 0).expect("loads");
        assert_eq!((s.train.len(), s.test.len()), (12, 8));
        assert!(s.test.iter().all(|x| x.timestamp >= Some(103)));
        assert_eq!(s.rating_range(), (1.0, 3.0));
    }

    #[test]
    fn item_genres_align_to_dataset_items() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("ml-100k")).expect("mkdir");
        std::fs::write(
            dir.path().join("ml-100k").join("ml-100k.item"),
            b"item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n\
              1\tToy Story\t1995\tAnimation Children's Comedy\n\
              543\tMis\xe9rables, Les\t1995\tDrama Musical\n\
              267\tunknown\t\n",
        )
        .expect("write");
        let ids = ["543", "1", "999", "267"].map(String::from);
        let genres = load_item_genres(dir.path(), &ids).expect("loads");
        assert_eq!(
            genres,
            [vec!["Drama", "Musical"], vec!["Animation", "Children's", "Comedy"], vec![], vec![],]
        );
    }

    #[test]
    fn item_genres_need_the_header_and_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = load_item_genres(dir.path(), &[]).expect_err("missing");
        assert!(matches!(err, DataError::Io { .. }), "{err:?}");
        std::fs::create_dir(dir.path().join("ml-100k")).expect("mkdir");
        let path = dir.path().join("ml-100k").join("ml-100k.item");
        std::fs::write(&path, b"1\tToy Story\t1995\tAnimation\n").expect("write");
        let err = load_item_genres(dir.path(), &[]).expect_err("no header");
        assert_eq!(malformed_line(&path, &err), 1);
    }

    #[test]
    fn numeric_and_textual_ids_stay_distinct() {
        assert_eq!(canonical_number(b"0"), Some(0));
        assert_eq!(canonical_number(b"1193"), Some(1193));
        assert_eq!(canonical_number(b"9999999999999999999"), Some(9_999_999_999_999_999_999));
        for raw in [&b""[..], b"007", b"00", b"-1", b"+1", b"1.0", b"12a", b"99999999999999999999"] {
            assert_eq!(canonical_number(raw), None, "{raw:?}");
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write(&dir, "ids.tsv", b"7\t1\t1\n007\t1\t2\n7\t2\t3\nx7\t01\t4\n007\t2\t5\n");
        let ds = load_file(&path).expect("loads");
        assert_eq!(ds.user_ids, ["7", "007", "x7"]);
        assert_eq!(ds.item_ids, ["1", "2", "01"]);
        let pairs: Vec<_> = ds.interactions.iter().map(|x| (x.user, x.item)).collect();
        assert_eq!(pairs, [(0, 0), (1, 0), (0, 1), (2, 2), (1, 1)]);
    }

    #[test]
    fn double_colon_splitting() {
        let mut ranges = Vec::new();
        let line = b"a::bc::::d:e";
        split_double_colon(line, &mut ranges);
        let fields: Vec<&[u8]> = ranges.iter().map(|r| &line[r.clone()]).collect();
        assert_eq!(fields, [&b"a"[..], b"bc", b"", b"d:e"]);
    }
}
