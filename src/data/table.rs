//! Tables as users keep them: a Parquet file, a folder of Parquet shards, an Arrow IPC file, or a
//! Hugging Face `datasets` folder written by `save_to_disk` (Arrow IPC shards listed in
//! `state.json`). Read in record batches of a few thousand rows and only the columns asked for, so
//! memory follows what the caller keeps, not the file's size. Problems name the file, the row (and
//! the Parquet row group) and the column.
use std::fs::File;
use std::io::{BufReader, Read, Seek};
use std::path::{Path, PathBuf};

use arrow_array::cast::AsArray;
use arrow_array::types::{
    ArrowDictionaryKeyType, Float16Type, Float32Type, Float64Type, Int8Type, Int16Type, Int32Type,
    Int64Type, UInt8Type, UInt16Type, UInt32Type, UInt64Type,
};
use arrow_array::{Array, RecordBatch, RecordBatchReader};
use arrow_buffer::ArrowNativeType;
use arrow_schema::DataType;
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use crate::error::{Error, Result};

/// Rows per record batch read.
const BATCH_ROWS: usize = 4096;

/// True when `path` is read as a table: a `.parquet` or `.arrow` file, or a folder.
pub(crate) fn is_table(path: &Path) -> bool {
    path.is_dir() || matches!(extension(path), "parquet" | "arrow")
}

/// True when the folder `dir` holds a table: Parquet or Arrow files, or `datasets`' `state.json`.
pub(crate) fn is_table_dir(dir: &Path) -> bool {
    dir.join("state.json").is_file()
        || dir.join("dataset_dict.json").is_file()
        || std::fs::read_dir(dir).is_ok_and(|entries| {
            entries
                .flatten()
                .any(|e| matches!(extension(&e.path()), "parquet" | "arrow"))
        })
}

fn extension(path: &Path) -> &str {
    path.extension().and_then(|e| e.to_str()).unwrap_or("")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Parquet,
    Arrow,
}

/// What a column must hold for its use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// A string.
    Text,
    /// A string or a list of strings.
    Texts,
    /// A floating-point or integer number.
    Number,
    /// An integer or a string (a class label, a cluster, an id).
    Key,
}

impl Kind {
    fn accepts(self, t: &DataType) -> bool {
        match self {
            Kind::Text => is_text(t),
            Kind::Texts => is_text(t) || list_item(t).is_some_and(is_text),
            Kind::Number => t.is_integer() || t.is_floating(),
            Kind::Key => t.is_integer() || is_text(t),
        }
    }

    fn expected(self) -> &'static str {
        match self {
            Kind::Text => "a string",
            Kind::Texts => "a string or a list of strings",
            Kind::Number => "a number",
            Kind::Key => "an integer or a string",
        }
    }
}

/// A string type: plain, or dictionary-encoded with a signed key (pandas' categoricals, which
/// pyarrow writes to Parquet as dictionaries).
fn is_text(t: &DataType) -> bool {
    match t {
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => true,
        DataType::Dictionary(k, v) => {
            matches!(
                **k,
                DataType::Int8 | DataType::Int16 | DataType::Int32 | DataType::Int64
            ) && is_text(v)
        }
        _ => false,
    }
}

fn list_item(t: &DataType) -> Option<&DataType> {
    match t {
        DataType::List(f) | DataType::LargeList(f) => Some(f.data_type()),
        _ => None,
    }
}

/// One table: its files in order and the columns of the first.
#[derive(Debug)]
pub(crate) struct Table {
    path: PathBuf,
    files: Vec<(PathBuf, Format)>,
    columns: Vec<(String, DataType)>,
}

impl Table {
    /// Finds the files of `path` and reads the first one's columns.
    pub(crate) fn open(path: &Path) -> Result<Table> {
        let files = if path.is_dir() {
            list_folder(path)?
        } else {
            let format = match extension(path) {
                "parquet" => Format::Parquet,
                "arrow" => Format::Arrow,
                _ => {
                    return Err(Error::invalid(
                        path,
                        "not a table: expected a .parquet or .arrow file or a folder of them",
                    ));
                }
            };
            vec![(path.to_path_buf(), format)]
        };
        let (first, format) = &files[0];
        let schema = match format {
            Format::Parquet => parquet_builder(first)?.schema().clone(),
            Format::Arrow => arrow_reader(first, None)?.schema(),
        };
        let columns = schema
            .fields()
            .iter()
            .map(|f| (f.name().clone(), f.data_type().clone()))
            .collect();
        Ok(Table {
            path: path.to_path_buf(),
            files,
            columns,
        })
    }

    /// The path the table was opened from.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Column names, in the table's order.
    pub(crate) fn names(&self) -> impl Iterator<Item = &str> {
        self.columns.iter().map(|(n, _)| n.as_str())
    }

    /// True when the table has a column `name`.
    pub(crate) fn has(&self, name: &str) -> bool {
        self.names().any(|n| n == name)
    }

    /// Streams the rows of `columns` (by name, each with what it must hold), file by file and batch
    /// by batch. A file lacking a column, or holding it with another type, is refused before any
    /// of its rows is read.
    pub(crate) fn scan(
        &self,
        columns: &[(&str, Kind)],
        mut each: impl FnMut(&Rows<'_>) -> Result<()>,
    ) -> Result<()> {
        for (path, format) in &self.files {
            match format {
                Format::Parquet => {
                    let builder = parquet_builder(path)?;
                    let indices = indices(path, builder.schema(), columns)?;
                    let mut starts = vec![0u64];
                    for g in builder.metadata().row_groups() {
                        starts.push(starts.last().unwrap() + g.num_rows().max(0) as u64);
                    }
                    let mask = ProjectionMask::roots(builder.parquet_schema(), indices);
                    let reader = builder
                        .with_projection(mask)
                        .with_batch_size(BATCH_ROWS)
                        .build()
                        .map_err(|e| Error::invalid(path, format!("unreadable Parquet: {e}")))?;
                    each_batch(path, reader, &starts, &mut each)?;
                }
                Format::Arrow => {
                    let schema = arrow_reader(path, None)?.schema();
                    let indices = indices(path, &schema, columns)?;
                    each_batch(path, arrow_reader(path, Some(indices))?, &[], &mut each)?;
                }
            }
        }
        Ok(())
    }
}

fn each_batch(
    path: &Path,
    reader: impl Iterator<Item = std::result::Result<RecordBatch, arrow_schema::ArrowError>>,
    group_starts: &[u64],
    each: &mut impl FnMut(&Rows<'_>) -> Result<()>,
) -> Result<()> {
    let mut first = 0u64;
    for batch in reader {
        let batch = batch
            .map_err(|e| Error::invalid(path, format!("unreadable after row {first}: {e}")))?;
        let rows = Rows {
            path,
            batch,
            first,
            group_starts,
        };
        each(&rows)?;
        first += rows.len() as u64;
    }
    Ok(())
}

/// The positions of `columns` in a file's schema, after checking each is there with a usable type.
fn indices(
    path: &Path,
    schema: &arrow_schema::Schema,
    columns: &[(&str, Kind)],
) -> Result<Vec<usize>> {
    let mut out = Vec::with_capacity(columns.len());
    for &(name, kind) in columns {
        let Ok(i) = schema.index_of(name) else {
            let names: Vec<&String> = schema.fields().iter().map(|f| f.name()).collect();
            return Err(Error::invalid(
                path,
                format!("no column {name:?} (the columns are {names:?})"),
            ));
        };
        let t = schema.field(i).data_type();
        if !kind.accepts(t) {
            return Err(Error::invalid(
                path,
                format!("column {name:?} holds {t}, expected {}", kind.expected()),
            ));
        }
        out.push(i);
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

fn parquet_builder(path: &Path) -> Result<ParquetRecordBatchReaderBuilder<File>> {
    let file = File::open(path).map_err(Error::io("open", path))?;
    ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| Error::invalid(path, format!("not a readable Parquet file: {e}")))
}

/// An Arrow IPC reader for either framing: the file format (`ARROW1` magic, what `pyarrow.ipc`'s
/// file writer makes) or the stream format (what `datasets` writes).
fn arrow_reader(path: &Path, projection: Option<Vec<usize>>) -> Result<Box<dyn RecordBatchReader>> {
    let mut file = File::open(path).map_err(Error::io("open", path))?;
    let mut magic = [0u8; 6];
    let n = file.read(&mut magic).map_err(Error::io("read", path))?;
    file.rewind().map_err(Error::io("read", path))?;
    let bad = |e: arrow_schema::ArrowError| {
        Error::invalid(path, format!("not a readable Arrow IPC file: {e}"))
    };
    Ok(if n == 6 && &magic == b"ARROW1" {
        Box::new(arrow_ipc::reader::FileReader::try_new_buffered(file, projection).map_err(bad)?)
    } else {
        Box::new(
            arrow_ipc::reader::StreamReader::try_new(BufReader::new(file), projection)
                .map_err(bad)?,
        )
    })
}

/// The files of a folder: a `datasets` `save_to_disk` folder (its `state.json` lists the Arrow
/// shards in order), or Parquet (else Arrow) files in name order.
fn list_folder(dir: &Path) -> Result<Vec<(PathBuf, Format)>> {
    let dict = dir.join("dataset_dict.json");
    if dict.is_file() {
        let splits = read_json::<DatasetDict>(&dict)?.splits;
        return Err(Error::invalid(
            dir,
            format!(
                "is a DatasetDict (splits {splits:?}): name one split's folder, e.g. {}",
                dir.join(splits.first().map_or("train", String::as_str))
                    .display()
            ),
        ));
    }
    let state = dir.join("state.json");
    if state.is_file() {
        let files = read_json::<State>(&state)?.data_files;
        if files.is_empty() {
            return Err(Error::invalid(
                &state,
                "field \"_data_files\" lists no file",
            ));
        }
        return files
            .into_iter()
            .map(|f| {
                let name = Path::new(&f.filename);
                if name.components().count() != 1 || name.file_name().is_none() {
                    return Err(Error::invalid(
                        &state,
                        format!("field \"_data_files\": {:?} is not a file name", f.filename),
                    ));
                }
                let path = dir.join(name);
                match path.is_file() {
                    true => Ok((path, Format::Arrow)),
                    false => Err(Error::invalid(
                        &state,
                        format!("lists {}, which is missing", path.display()),
                    )),
                }
            })
            .collect();
    }
    let mut found: Vec<(PathBuf, Format)> = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(Error::io("read the folder", dir))? {
        let path = entry.map_err(Error::io("read the folder", dir))?.path();
        let format = match extension(&path) {
            "parquet" => Format::Parquet,
            "arrow" => Format::Arrow,
            _ => continue,
        };
        if path.is_file() {
            found.push((path, format));
        }
    }
    if found.iter().any(|(_, f)| *f == Format::Parquet) {
        found.retain(|(_, f)| *f == Format::Parquet);
    }
    if found.is_empty() {
        return Err(Error::invalid(
            dir,
            "holds no .parquet or .arrow file and no state.json (a `datasets` save_to_disk folder)",
        ));
    }
    found.sort_by(|a, b| a.0.cmp(&b.0));
    check_one_split(dir, &found)?;
    Ok(found)
}

/// Refuses a folder holding the shards of several splits (`train-00000-of-00002.parquet` beside
/// `test-00000-of-00001.parquet`, as Hub repositories lay them out): read together they would mix
/// evaluation data into training.
fn check_one_split(dir: &Path, files: &[(PathBuf, Format)]) -> Result<()> {
    let mut splits: Vec<&str> = files
        .iter()
        .filter_map(|(p, _)| split_of(p.file_stem()?.to_str()?))
        .collect();
    splits.sort_unstable();
    splits.dedup();
    if splits.len() > 1 {
        return Err(Error::invalid(
            dir,
            format!(
                "holds the shards of several splits {splits:?}: list one split's files, or give each split a folder"
            ),
        ));
    }
    Ok(())
}

/// The split of a shard named `<split>-<i>-of-<n>`.
fn split_of(stem: &str) -> Option<&str> {
    let (rest, n) = stem.rsplit_once("-of-")?;
    let (split, i) = rest.rsplit_once('-')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    (digits(n) && digits(i) && !split.is_empty()).then_some(split)
}

#[derive(serde::Deserialize)]
struct DatasetDict {
    splits: Vec<String>,
}

#[derive(serde::Deserialize)]
struct State {
    #[serde(rename = "_data_files")]
    data_files: Vec<DataFile>,
}

#[derive(serde::Deserialize)]
struct DataFile {
    filename: String,
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(Error::io("read", path))?;
    serde_json::from_str(&text).map_err(|e| Error::invalid(path, format!("invalid JSON: {e}")))
}

/// A record batch of a table, and where its rows are.
pub(crate) struct Rows<'a> {
    path: &'a Path,
    batch: RecordBatch,
    /// The file row of the batch's first row.
    first: u64,
    /// Parquet: the first file row of each row group, then the row count.
    group_starts: &'a [u64],
}

impl Rows<'_> {
    /// Rows in the batch.
    pub(crate) fn len(&self) -> usize {
        self.batch.num_rows()
    }

    /// The column `name`, one of those scanned.
    pub(crate) fn column(&self, name: &str) -> Result<Column<'_>> {
        match self.batch.column_by_name(name) {
            Some(array) => Ok(Column { array }),
            None => Err(Error::Internal(format!("column {name:?} was not scanned"))),
        }
    }

    /// Where row `i` of the batch is, as a user finds it: the file's row counted from 0 (as
    /// `datasets` and pandas index it) and, in Parquet, its row group.
    pub(crate) fn place(&self, i: usize) -> String {
        let row = self.first + i as u64;
        match self.group_starts.partition_point(|&s| s <= row) {
            0 => format!("row {row}"),
            g => format!("row {row} (row group {})", g - 1),
        }
    }

    /// The error for row `i` of the batch, in `column` when one is to blame.
    pub(crate) fn error(&self, i: usize, column: Option<&str>, reason: impl Into<String>) -> Error {
        Error::BadRow {
            path: self.path.to_path_buf(),
            place: self.place(i),
            column: column.map(str::to_string),
            reason: reason.into(),
        }
    }
}

/// One column of a batch, of a type its [`Kind`] accepts (checked when the scan began).
pub(crate) struct Column<'a> {
    array: &'a dyn Array,
}

/// An integer or a string: a class label, a cluster or an id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Key<'a> {
    Int(i64),
    Text(&'a str),
}

impl<'a> Column<'a> {
    /// The string of row `i`, `None` when null.
    pub(crate) fn text(&self, i: usize) -> Option<&'a str> {
        text_at(self.array, i)
    }

    /// The strings of row `i` (one for a string column), `None` when the row is null; a null
    /// inside a list is an error.
    pub(crate) fn texts(&self, i: usize) -> std::result::Result<Option<Vec<&'a str>>, String> {
        if self.array.is_null(i) {
            return Ok(None);
        }
        let (values, start, end) = match self.array.data_type() {
            DataType::List(_) => {
                let l = self.array.as_list::<i32>();
                let o = l.value_offsets();
                (l.values(), o[i] as usize, o[i + 1] as usize)
            }
            DataType::LargeList(_) => {
                let l = self.array.as_list::<i64>();
                let o = l.value_offsets();
                (l.values(), o[i] as usize, o[i + 1] as usize)
            }
            _ => return Ok(text_at(self.array, i).map(|t| vec![t])),
        };
        (start..end)
            .map(|j| {
                text_at(values.as_ref(), j)
                    .ok_or_else(|| format!("item {} of the list is null", j - start))
            })
            .collect::<std::result::Result<Vec<_>, _>>()
            .map(Some)
    }

    /// The number of row `i`, `None` when null.
    pub(crate) fn number(&self, i: usize) -> Option<f64> {
        if self.array.is_null(i) {
            return None;
        }
        let a = self.array;
        Some(match a.data_type() {
            DataType::Float16 => a.as_primitive::<Float16Type>().value(i).to_f64(),
            DataType::Float32 => a.as_primitive::<Float32Type>().value(i) as f64,
            DataType::Float64 => a.as_primitive::<Float64Type>().value(i),
            _ => return integer_at(a, i).map(|v| v as f64),
        })
    }

    /// The integer or string of row `i`, `None` when null (or an integer beyond `i64`).
    pub(crate) fn key(&self, i: usize) -> Option<Key<'a>> {
        match text_at(self.array, i) {
            Some(t) => Some(Key::Text(t)),
            None => integer_at(self.array, i).map(Key::Int),
        }
    }
}

fn text_at(a: &dyn Array, i: usize) -> Option<&str> {
    if a.is_null(i) {
        return None;
    }
    match a.data_type() {
        DataType::Utf8 => Some(a.as_string::<i32>().value(i)),
        DataType::LargeUtf8 => Some(a.as_string::<i64>().value(i)),
        DataType::Utf8View => Some(a.as_string_view().value(i)),
        DataType::Dictionary(k, _) => match **k {
            DataType::Int8 => dictionary_text::<Int8Type>(a, i),
            DataType::Int16 => dictionary_text::<Int16Type>(a, i),
            DataType::Int32 => dictionary_text::<Int32Type>(a, i),
            DataType::Int64 => dictionary_text::<Int64Type>(a, i),
            _ => None,
        },
        _ => None,
    }
}

/// The string row `i` of a dictionary-encoded column points at.
fn dictionary_text<K: ArrowDictionaryKeyType>(a: &dyn Array, i: usize) -> Option<&str> {
    let d = a.as_dictionary::<K>();
    let key = d.keys().value(i).as_usize();
    let values = d.values();
    (key < values.len())
        .then(|| text_at(values.as_ref(), key))
        .flatten()
}

fn integer_at(a: &dyn Array, i: usize) -> Option<i64> {
    if a.is_null(i) {
        return None;
    }
    match a.data_type() {
        DataType::Int8 => Some(a.as_primitive::<Int8Type>().value(i) as i64),
        DataType::Int16 => Some(a.as_primitive::<Int16Type>().value(i) as i64),
        DataType::Int32 => Some(a.as_primitive::<Int32Type>().value(i) as i64),
        DataType::Int64 => Some(a.as_primitive::<Int64Type>().value(i)),
        DataType::UInt8 => Some(a.as_primitive::<UInt8Type>().value(i) as i64),
        DataType::UInt16 => Some(a.as_primitive::<UInt16Type>().value(i) as i64),
        DataType::UInt32 => Some(a.as_primitive::<UInt32Type>().value(i) as i64),
        DataType::UInt64 => i64::try_from(a.as_primitive::<UInt64Type>().value(i)).ok(),
        _ => None,
    }
}

/// An id read from a table: an integer or a string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Id {
    Int(i64),
    Text(String),
}

impl std::fmt::Display for Id {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Id::Int(i) => write!(f, "{i}"),
            Id::Text(t) => f.write_str(t),
        }
    }
}

impl From<Key<'_>> for Id {
    fn from(k: Key<'_>) -> Self {
        match k {
            Key::Int(i) => Id::Int(i),
            Key::Text(t) => Id::Text(t.to_string()),
        }
    }
}

/// The texts of a table of texts (inputs to embed, queries, a corpus): its `text` column, or its
/// only string column, with its `id` (or `_id`) column when it has one. A null is an error.
pub(crate) fn read_texts(path: &Path) -> Result<Vec<(Option<Id>, String)>> {
    let table = Table::open(path)?;
    let strings: Vec<&str> = table
        .columns
        .iter()
        .filter(|(n, t)| is_text(t) && !["id", "_id"].contains(&n.as_str()))
        .map(|(n, _)| n.as_str())
        .collect();
    let text = match (table.has("text"), strings.as_slice()) {
        (true, _) => "text",
        (false, [one]) => one,
        _ => {
            let names: Vec<&str> = table.names().collect();
            return Err(Error::invalid(
                path,
                format!("has no \"text\" column and not exactly one string column: {names:?}"),
            ));
        }
    };
    let id = ["id", "_id"].into_iter().find(|n| table.has(n));
    let mut scan = vec![(text, Kind::Text)];
    scan.extend(id.map(|n| (n, Kind::Key)));
    let mut out = Vec::new();
    table.scan(&scan, |rows| {
        let texts = rows.column(text)?;
        let ids = id.map(|n| rows.column(n)).transpose()?;
        for i in 0..rows.len() {
            let null = |name: &str| rows.error(i, Some(name), "null in a required column");
            let t = texts.text(i).ok_or_else(|| null(text))?;
            let row_id = match (&ids, id) {
                (Some(c), Some(name)) => Some(c.key(i).ok_or_else(|| null(name))?.into()),
                _ => None,
            };
            out.push((row_id, t.to_string()));
        }
        Ok(())
    })?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_names_give_their_split() {
        assert_eq!(split_of("train-00000-of-00002"), Some("train"));
        assert_eq!(split_of("my-test-00001-of-00003"), Some("my-test"));
        for plain in [
            "data",
            "train-x-of-00002",
            "-00000-of-00001",
            "train-00000-of-",
        ] {
            assert_eq!(split_of(plain), None, "{plain}");
        }
    }

    #[test]
    fn a_folder_of_one_split_is_read_in_name_order_and_a_state_json_may_not_leave_it() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["b.parquet", "a.parquet", "notes.txt"] {
            std::fs::write(dir.path().join(name), b"x").unwrap();
        }
        let files = list_folder(dir.path()).unwrap();
        let names: Vec<_> = files.iter().map(|(p, _)| p.file_name().unwrap()).collect();
        assert_eq!(names, ["a.parquet", "b.parquet"]);
        std::fs::write(
            dir.path().join("state.json"),
            br#"{"_data_files": [{"filename": "../secret.arrow"}]}"#,
        )
        .unwrap();
        let err = list_folder(dir.path()).unwrap_err().to_string();
        assert!(err.contains("is not a file name"), "{err}");
    }
}
