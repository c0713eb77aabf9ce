//! Adoption of an existing outbox table (Debezium's layout by default), unchanged.
//!
//! `outbox-relay adopt` installs on the existing table an `AFTER INSERT ... FOR EACH ROW`
//! trigger whose function maps the new row into the relay's own outbox table in the same
//! transaction: topic from a template over columns, key, payload and headers from columns.
//! The application's table and code stay as they are; the relay reads its own table as
//! always. The mapping is checked against `information_schema` before anything is changed.
//!
//! The bytes are those of Debezium Server 3.0 (EventRouter, Kafka sink), checked side by side
//! by `make adopt-compare` (bench/adopt_compare.py): JSON as Jackson writes it (characters
//! outside the BMP as surrogate-pair escapes, control characters in upper-case hex), headers
//! as its header converter writes them, and its `route.tombstone.on.empty.payload`.

use sqlx::{AssertSqlSafe, Connection, PgConnection};

use crate::table::{quote_ident, quote_literal, TableName};

/// Name of the trigger on the adopted table (trigger names are per table).
pub const TRIGGER: &str = "outbox_relay_adopt";
/// Comment prefix on the trigger function, so `doctor` can find adoptions feeding a table.
pub const COMMENT_PREFIX: &str = "outbox-relay adopt: ";

/// How a key or payload column is encoded into bytes, matching a Kafka Connect converter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Encoding {
    /// The column's text (Kafka Connect `StringConverter`; Debezium Server `simplestring`).
    Raw,
    /// The column as a JSON value: strings quoted and escaped as Jackson does, integers bare
    /// (Kafka Connect `JsonConverter` with `schemas.enable=false`; Debezium Server `json`).
    Json,
}

/// How header values are encoded, matching a header converter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum HeaderFormat {
    /// Debezium Server's `debezium.format.header=json` (its default): Kafka Connect's
    /// `JsonConverter`, a schema envelope around the value unless schemas are disabled.
    Json,
    /// Kafka Connect's default `SimpleHeaderConverter`: the column's text; a NULL column
    /// leaves the header out (it sends a header without a value).
    String,
}

/// One `${column}` placeholder or a literal part of `--topic-template`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Column(String),
}

/// A parsed `--topic-template`: literal parts are legal topic characters only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicTemplate(Vec<Part>);

impl TopicTemplate {
    pub fn parse(s: &str) -> Result<TopicTemplate, String> {
        let mut parts = Vec::new();
        let mut rest = s;
        while !rest.is_empty() {
            match rest.find('$') {
                Some(0) => {
                    let inner = rest
                        .strip_prefix("${")
                        .and_then(|r| r.split_once('}'))
                        .ok_or_else(|| {
                            format!("{s:?}: '$' must start a ${{column}} placeholder")
                        })?;
                    check_column(inner.0).map_err(|e| format!("{s:?}: placeholder {e}"))?;
                    parts.push(Part::Column(inner.0.to_string()));
                    rest = inner.1;
                }
                found => {
                    let (lit, tail) = rest.split_at(found.unwrap_or(rest.len()));
                    if let Some(c) = lit
                        .chars()
                        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
                    {
                        return Err(format!(
                            "{s:?} contains {c:?}; outside ${{column}} placeholders a topic uses only letters, digits, '.', '_' and '-'"
                        ));
                    }
                    parts.push(Part::Literal(lit.to_string()));
                    rest = tail;
                }
            }
        }
        if parts.is_empty() {
            return Err("the topic template is empty".into());
        }
        Ok(TopicTemplate(parts))
    }

    fn columns(&self) -> impl Iterator<Item = &str> {
        self.0.iter().filter_map(|p| match p {
            Part::Column(c) => Some(c.as_str()),
            Part::Literal(_) => None,
        })
    }
}

/// One `column[:header-name]` of `--header-columns`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderColumn {
    pub column: String,
    pub header: String,
}

impl HeaderColumn {
    pub fn parse(s: &str) -> Result<HeaderColumn, String> {
        let (column, header) = s.split_once(':').unwrap_or((s, s));
        check_column(column)?;
        if header.is_empty() || header.chars().any(|c| c.is_control() || c == '$') {
            return Err(format!(
                "header name {header:?} is empty or contains '$' or a control character"
            ));
        }
        if crate::event::is_reserved_header(header) {
            return Err(format!(
                "header name {header:?} is reserved for the relay; pick another (column:header-name)"
            ));
        }
        Ok(HeaderColumn {
            column: column.to_string(),
            header: header.to_string(),
        })
    }
}

/// Column names end up inside a dollar-quoted function body: refuse `$` and control characters.
pub fn check_column(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 63 || name.chars().any(|c| c.is_control() || c == '$') {
        return Err(format!(
            "column {name:?} is empty, longer than 63 bytes, or contains '$' or a control character"
        ));
    }
    Ok(())
}

/// The whole mapping from an adopted table's row to an outbox row.
#[derive(Debug, Clone)]
pub struct Mapping {
    pub source: TableName,
    pub id_column: String,
    pub key_column: String,
    pub payload_column: String,
    pub topic: TopicTemplate,
    pub headers: Vec<HeaderColumn>,
    pub key_format: Encoding,
    pub payload_format: Encoding,
    pub header_format: HeaderFormat,
    /// `--header-schemas-enable`: with `HeaderFormat::Json`, the schema envelope.
    pub header_schemas: bool,
    /// `--route-tombstone-on-empty-payload`: a NULL or blank payload becomes a tombstone.
    pub tombstone_on_empty_payload: bool,
}

/// Why a mapping cannot be installed. Every variant but `Database` is the operator's to fix.
#[derive(Debug, thiserror::Error)]
pub enum AdoptError {
    #[error(
        "--source-table {0}: no such table (check the schema and the exact, case-sensitive name)"
    )]
    NoSourceTable(TableName),
    #[error("--source-table {0} is the relay's own --table; adopt another application's table")]
    SourceIsTarget(TableName),
    #[error("{flag}: table {table} has no column {column:?}; its columns are: {columns}")]
    MissingColumn {
        flag: &'static str,
        column: String,
        table: TableName,
        columns: String,
    },
    #[error("{flag}: column {column:?} has type {found}, which cannot be mapped; use a column of type {allowed}")]
    UnsupportedType {
        flag: &'static str,
        column: String,
        found: String,
        allowed: &'static str,
    },
    #[error(
        "--header-columns: header {0:?} is given twice (the event id is always header \"id\")"
    )]
    DuplicateHeader(String),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// Column types a key, topic part or header can come from (`udt_name`s).
const SCALAR_TYPES: &[&str] = &["text", "varchar", "uuid", "int2", "int4", "int8"];
const SCALAR_ALLOWED: &str = "text, varchar, uuid, smallint, integer or bigint";
/// Column types a payload can come from; `bytea` only with `--payload-format raw`.
const PAYLOAD_TYPES: &[&str] = &["jsonb", "json", "text", "varchar", "bytea"];
const PAYLOAD_ALLOWED: &str = "jsonb, json, text, varchar (or bytea with --payload-format raw)";

/// A column of the adopted table, as `information_schema.columns` reports it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Column {
    pub column_name: String,
    pub udt_name: String,
    pub is_nullable: bool,
    /// The DEFAULT expression: Debezium puts a value derived from it in the column's schema.
    pub column_default: Option<String>,
}

/// A mapping checked against the table's real columns: what the trigger function needs.
#[derive(Debug, Clone)]
pub struct Checked {
    mapping: Mapping,
    /// The mapped columns by name (type and nullability decide their JSON and header schema).
    columns: Vec<Column>,
    payload_is_bytea: bool,
}

impl Mapping {
    /// Check every mapped column exists with a type it can map.
    pub fn check(self, columns: &[Column], target: &TableName) -> Result<Checked, AdoptError> {
        if &self.source == target {
            return Err(AdoptError::SourceIsTarget(self.source));
        }
        if columns.is_empty() {
            return Err(AdoptError::NoSourceTable(self.source));
        }
        let mut seen = vec!["id"];
        for h in &self.headers {
            if seen.contains(&h.header.as_str()) {
                return Err(AdoptError::DuplicateHeader(h.header.clone()));
            }
            seen.push(&h.header);
        }
        let find = |flag: &'static str, name: &str, types: &[&str], allowed: &'static str| {
            let Some(c) = columns.iter().find(|c| c.column_name == name) else {
                return Err(AdoptError::MissingColumn {
                    flag,
                    column: name.to_string(),
                    table: self.source.clone(),
                    columns: columns
                        .iter()
                        .map(|c| format!("{} ({})", c.column_name, c.udt_name))
                        .collect::<Vec<_>>()
                        .join(", "),
                });
            };
            if !types.contains(&c.udt_name.as_str()) {
                return Err(AdoptError::UnsupportedType {
                    flag,
                    column: name.to_string(),
                    found: c.udt_name.clone(),
                    allowed,
                });
            }
            Ok(c.udt_name.clone())
        };
        let mapped: Vec<Column> = columns
            .iter()
            .filter(|c| {
                [&self.id_column, &self.key_column, &self.payload_column]
                    .into_iter()
                    .map(String::as_str)
                    .chain(self.headers.iter().map(|h| h.column.as_str()))
                    .chain(self.topic.columns())
                    .any(|m| m == c.column_name)
            })
            .cloned()
            .collect();
        find("--id-column", &self.id_column, SCALAR_TYPES, SCALAR_ALLOWED)?;
        find(
            "--key-column",
            &self.key_column,
            SCALAR_TYPES,
            SCALAR_ALLOWED,
        )?;
        for c in self.topic.columns() {
            find("--topic-template", c, SCALAR_TYPES, SCALAR_ALLOWED)?;
        }
        for h in &self.headers {
            find("--header-columns", &h.column, SCALAR_TYPES, SCALAR_ALLOWED)?;
        }
        let payload_type = find(
            "--payload-column",
            &self.payload_column,
            PAYLOAD_TYPES,
            PAYLOAD_ALLOWED,
        )?;
        let payload_is_bytea = payload_type == "bytea";
        if payload_is_bytea && self.payload_format == Encoding::Json {
            return Err(AdoptError::UnsupportedType {
                flag: "--payload-format json",
                column: self.payload_column.clone(),
                found: payload_type,
                allowed: "jsonb, json, text or varchar; publish a bytea payload with --payload-format raw",
            });
        }
        Ok(Checked {
            mapping: self,
            columns: mapped,
            payload_is_bytea,
        })
    }
}

/// `NEW."column"`: a column of the inserted row.
fn new_col(column: &str) -> String {
    format!("NEW.{}", quote_ident(column))
}

/// Whether a column type is published as a JSON number (else a JSON string).
fn is_integer(udt_name: &str) -> bool {
    matches!(udt_name, "int2" | "int4" | "int8")
}

/// The Kafka Connect schema Debezium's PostgreSQL connector gives a column, as JsonConverter
/// writes it in a header's schema envelope (key order as JsonConverter's).
fn connect_schema(column: &Column) -> String {
    let (kind, name) = match column.udt_name.as_str() {
        "int2" => ("int16", None),
        "int4" => ("int32", None),
        "int8" => ("int64", None),
        "uuid" => ("string", Some("io.debezium.data.Uuid")),
        _ => ("string", None),
    };
    let mut schema = format!(r#"{{"type":"{kind}","optional":{}"#, column.is_nullable);
    if let Some(name) = name {
        schema.push_str(&format!(r#","name":"{name}","version":1"#));
    }
    if let Some(default) = debezium_default(column) {
        let json = if is_integer(&column.udt_name) {
            default
        } else {
            jackson_string(&default)
        };
        schema.push_str(&format!(r#","default":{json}"#));
    }
    schema.push('}');
    schema
}

/// The default Debezium's PostgreSQL connector (3.0, `PostgresDefaultValueConverter`) derives
/// from a column's DEFAULT expression (`pg_get_expr`, as `information_schema` shows it), as the
/// column's text; None when it derives none. It is in the column's schema, and the router reads
/// a NULL column as it (Kafka Connect's `Struct.get` returns a NULL field's schema default): in
/// the key, the payload, the headers and the topic. A function call (`gen_random_uuid()`, `nextval(...)`) gives
/// the type's placeholder (all-zero uuid, 0, ''); otherwise the text inside the first pair of
/// quotes, or the whole expression when it has no quote. Its quirks are kept on purpose: they
/// are what Debezium writes (`'it''s'::text` gives "it").
fn debezium_default(column: &Column) -> Option<String> {
    let expr = column.column_default.as_deref()?;
    let integer = is_integer(&column.udt_name);
    let uuid = column.udt_name == "uuid";
    // Java's String.trim(), for the types Debezium trims.
    let expr = if integer || uuid {
        expr.trim_matches(|c: char| c <= ' ')
    } else {
        expr
    };
    if integer && expr.starts_with("NULL::") {
        return None;
    }
    let placeholder = match column.udt_name.as_str() {
        "uuid" => "00000000-0000-0000-0000-000000000000",
        "int2" | "int4" | "int8" => "0",
        "json" | "jsonb" => "{}",
        "text" | "varchar" => "",
        _ => return None, // bytea: Debezium has no default mapper for it
    };
    let text = if is_function_call(expr)
        || [
            "current_timestamp",
            "current_time",
            "current_date",
            "localtime",
            "localtimestamp",
        ]
        .contains(&expr.to_lowercase().as_str())
    {
        placeholder
    } else if expr.contains('\'') {
        first_quoted(expr)?
    } else if expr.starts_with("NULL::") {
        return None;
    } else {
        expr
    };
    match column.udt_name.as_str() {
        "int2" => text.parse::<i16>().ok().map(|v| v.to_string()),
        "int4" => text.parse::<i32>().ok().map(|v| v.to_string()),
        "int8" => text.parse::<i64>().ok().map(|v| v.to_string()),
        "uuid" => {
            let canonical = text.len() == 36
                && text.char_indices().all(|(i, c)| match i {
                    8 | 13 | 18 | 23 => c == '-',
                    _ => c.is_ascii_hexdigit(),
                });
            canonical.then(|| text.to_ascii_lowercase())
        }
        _ => Some(text.to_string()),
    }
}

/// Java's `.` matches anything but these line terminators.
fn java_line_terminator(c: char) -> bool {
    matches!(c, '\n' | '\r' | '\u{85}' | '\u{2028}' | '\u{2029}')
}

/// Debezium's `^[(]?[A-Za-z0-9_.]+\((?:.+(?:, ?.+)*)?\)` (found at the start): a function call.
fn is_function_call(expr: &str) -> bool {
    let s = expr.strip_prefix('(').unwrap_or(expr);
    let name_len = s
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '.'))
        .unwrap_or(s.len());
    let args = &s[name_len..];
    name_len > 0
        && args.starts_with('(')
        && args[1..]
            .split(java_line_terminator)
            .next()
            .is_some_and(|line| line.contains(')'))
}

/// Debezium's `'(.*?)'` (the first match): the text of the first quoted run without a line
/// terminator; None where Java finds no match (and Debezium derives no default).
fn first_quoted(expr: &str) -> Option<&str> {
    let quotes: Vec<usize> = expr.match_indices('\'').map(|(i, _)| i).collect();
    quotes.windows(2).find_map(|w| {
        let inner = &expr[w[0] + 1..w[1]];
        (!inner.contains(java_line_terminator)).then_some(inner)
    })
}

/// A string as Jackson writes it in JSON: what the `..._outbox_relay_json` SQL function does.
fn jackson_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\u{c}' => out.push_str("\\f"),
            '\r' => out.push_str("\\r"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04X}", c as u32)),
            c if (c as u32) > 0xFFFF => {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{u:04X}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A text literal that reads the same whatever `standard_conforming_strings` the inserting
/// session has: `E'...'` when it holds a backslash.
fn text_literal(s: &str) -> String {
    if s.contains('\\') {
        format!("E'{}'", s.replace('\\', "\\\\").replace('\'', "''"))
    } else {
        quote_literal(s)
    }
}

impl Checked {
    /// The function name: derived from the adopted table, in its schema.
    fn function(&self) -> String {
        function_name(&self.mapping.source)
    }

    fn column(&self, name: &str) -> &Column {
        self.columns
            .iter()
            .find(|c| c.column_name == name)
            .expect("check() kept every mapped column")
    }

    /// A column's text as the router reads it: a NULL column as its Debezium default
    /// (`debezium_default`), else NULL.
    fn text_sql(&self, column: &str) -> String {
        match debezium_default(self.column(column)) {
            Some(default) => format!(
                "coalesce({}::text, {})",
                new_col(column),
                text_literal(&default)
            ),
            None => format!("{}::text", new_col(column)),
        }
    }

    /// A column as JsonConverter writes it: integers bare, text as a JSON string, NULL `null`.
    fn json_sql(&self, column: &str) -> String {
        let text = self.text_sql(column);
        if is_integer(&self.column(column).udt_name) {
            format!("coalesce({text}, 'null')")
        } else {
            format!(
                "coalesce({}({text}), 'null')",
                json_function(&self.mapping.source)
            )
        }
    }

    fn key_sql(&self) -> String {
        let k = &self.mapping.key_column;
        match self.mapping.key_format {
            Encoding::Raw => self.text_sql(k),
            Encoding::Json => self.json_sql(k),
        }
    }

    /// A header's value: the column's text, or its JSON (with the schema envelope).
    fn header_value_sql(&self, column: &str) -> String {
        let m = &self.mapping;
        match (m.header_format, m.header_schemas) {
            (HeaderFormat::String, _) => self.text_sql(column),
            (HeaderFormat::Json, false) => self.json_sql(column),
            (HeaderFormat::Json, true) => format!(
                "{} || {} || '}}'",
                text_literal(&format!(
                    r#"{{"schema":{},"payload":"#,
                    connect_schema(self.column(column))
                )),
                self.json_sql(column)
            ),
        }
    }

    fn topic_sql(&self) -> String {
        self.mapping
            .topic
            .0
            .iter()
            .map(|p| match p {
                Part::Literal(l) => quote_literal(l),
                // A NULL would fail the application's insert (topic is NOT NULL); instead the
                // row gets an illegal topic naming the column, and the relay parks it visibly.
                Part::Column(c) => format!(
                    "coalesce({}, {})",
                    self.text_sql(c),
                    quote_literal(&format!("<null {c}>"))
                ),
            })
            .collect::<Vec<_>>()
            .join(" || ")
    }

    fn payload_sql(&self) -> String {
        let m = &self.mapping;
        // bytea (raw only): NULL is a tombstone whatever the option; the router's emptiness test
        // (`payload.toString().trim().isEmpty()`) never holds for a byte buffer.
        if self.payload_is_bytea {
            return new_col(&m.payload_column);
        }
        let text = self.text_sql(&m.payload_column);
        let value = match m.payload_format {
            // StringConverter turns a NULL payload into a tombstone.
            Encoding::Raw => format!("convert_to({text}, 'UTF8')"),
            // JsonConverter writes a NULL payload as `null`.
            Encoding::Json => format!("convert_to({}, 'UTF8')", self.json_sql(&m.payload_column)),
        };
        if m.tombstone_on_empty_payload {
            // Java's trim() strips every character up to U+0020 from both ends.
            format!(
                r"CASE WHEN {text} IS NULL OR {text} ~ E'^[\\x01-\\x20]*$' THEN NULL ELSE {value} END"
            )
        } else {
            value
        }
    }

    fn headers_sql(&self) -> String {
        let m = &self.mapping;
        let pairs: Vec<String> = std::iter::once(("id", m.id_column.as_str()))
            .chain(
                m.headers
                    .iter()
                    .map(|h| (h.header.as_str(), h.column.as_str())),
            )
            .map(|(header, column)| {
                format!(
                    "{}, {}",
                    quote_literal(header),
                    self.header_value_sql(column)
                )
            })
            .collect();
        let pairs = pairs.join(",\n                ");
        // With --header-format string, a NULL column's header is left out (a row header must
        // be a string; SimpleHeaderConverter sends a header without a value). JSON is never NULL.
        format!("jsonb_strip_nulls(jsonb_build_object(\n                {pairs}))")
    }

    /// The DDL that installs (or replaces) the mapping trigger. Idempotent.
    pub fn ddl(&self, target: &TableName) -> String {
        let m = &self.mapping;
        let source = m.source.quoted();
        let function = self.function();
        let comment = quote_literal(&format!("{COMMENT_PREFIX}{} -> {target}", m.source));
        let trigger = quote_ident(TRIGGER);
        format!(
            r#"-- outbox-relay adopt: each row inserted into {src} is copied into {target}
-- by this trigger, in the inserting transaction. Idempotent: safe to apply again.
{json_ddl}
CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql
    SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $adopt$
BEGIN
    INSERT INTO {t} (topic, key, payload, headers)
    VALUES ({topic},
            {key},
            {payload},
            {headers});
    RETURN NULL;
END
$adopt$;
COMMENT ON FUNCTION {function}() IS {comment};

DO $do$ BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = {regclass}::regclass AND tgname = {trigger_name}) THEN
        CREATE TRIGGER {trigger} AFTER INSERT ON {source}
            FOR EACH ROW EXECUTE FUNCTION {function}();
    END IF;
END $do$;
"#,
            src = m.source,
            t = target.quoted(),
            json_ddl = json_function_ddl(&m.source),
            topic = self.topic_sql(),
            key = self.key_sql(),
            payload = self.payload_sql(),
            headers = self.headers_sql(),
            regclass = quote_literal(&source),
            trigger_name = quote_literal(TRIGGER),
        )
    }
}

fn function_name(source: &TableName) -> String {
    format!(
        "{}.{}",
        quote_ident(source.schema()),
        quote_ident(&format!("{}_outbox_relay", source.table()))
    )
}

/// The helper that writes text as a JSON string, next to the trigger function.
fn json_function(source: &TableName) -> String {
    format!(
        "{}.{}",
        quote_ident(source.schema()),
        quote_ident(&format!("{}_outbox_relay_json", source.table()))
    )
}

/// Text as Jackson (JsonConverter) writes a JSON string: as `to_jsonb(text)::text`, except that
/// a character outside the BMP is a UTF-16 surrogate pair of escapes (`\uD83D\uDE00`) and a
/// control character is escaped in upper-case hex (`\u001F`). A string without such characters
/// costs one regular expression test more than `to_jsonb`; one with them is cut around them.
/// NULL stays NULL. PL/pgSQL, so its plans are cached (a non-inlined SQL function would be
/// planned again on every row); no pinned search_path: only the trigger function, which pins
/// it, calls it, and it runs with its caller's rights.
fn json_function_ddl(source: &TableName) -> String {
    format!(
        r#"-- Text as a JSON string, as Debezium's JsonConverter (Jackson) writes it.
CREATE OR REPLACE FUNCTION {}(s text) RETURNS text LANGUAGE plpgsql
    IMMUTABLE STRICT PARALLEL SAFE AS $json$
DECLARE
    plain text[];
    part text;
    encoded text := '"';
    pos int := 0;
    code int;
BEGIN
    IF s !~ E'[^\\x20-\\uFFFF]' THEN
        RETURN to_jsonb(s)::text;
    END IF;
    plain := regexp_split_to_array(s, E'[^\\x20-\\uFFFF]');
    FOR i IN 1 .. array_length(plain, 1) LOOP
        part := to_jsonb(plain[i])::text;
        encoded := encoded || substr(part, 2, length(part) - 2);
        pos := pos + length(plain[i]) + 1;
        CONTINUE WHEN i = array_length(plain, 1);
        code := ascii(substr(s, pos, 1));
        encoded := encoded || CASE
            WHEN code > 65535 THEN E'\\u' || upper(to_hex(55232 + (code >> 10)))
                                || E'\\u' || upper(to_hex(56320 + (code & 1023)))
            WHEN code = 8 THEN E'\\b'
            WHEN code = 9 THEN E'\\t'
            WHEN code = 10 THEN E'\\n'
            WHEN code = 12 THEN E'\\f'
            WHEN code = 13 THEN E'\\r'
            ELSE E'\\u00' || upper(lpad(to_hex(code), 2, '0')) END;
    END LOOP;
    RETURN encoded || '"';
END
$json$;"#,
        json_function(source)
    )
}

/// The DDL that removes the mapping trigger and its functions. Idempotent.
pub fn remove_ddl(source: &TableName) -> String {
    format!(
        "-- outbox-relay adopt --remove: stop copying rows of {source}.\nDROP TRIGGER IF EXISTS {} ON {};\nDROP FUNCTION IF EXISTS {}();\nDROP FUNCTION IF EXISTS {}(text);\n",
        quote_ident(TRIGGER),
        source.quoted(),
        function_name(source),
        json_function(source)
    )
}

/// The adopted table's columns, in table order (none when the table does not exist).
pub async fn columns(
    conn: &mut PgConnection,
    source: &TableName,
) -> Result<Vec<Column>, sqlx::Error> {
    sqlx::query_as(
        "SELECT column_name::text, udt_name::text, is_nullable = 'YES' AS is_nullable, \
         column_default::text FROM information_schema.columns WHERE table_schema = $1 AND table_name = $2 ORDER BY ordinal_position",
    )
    .bind(source.schema())
    .bind(source.table())
    .fetch_all(conn)
    .await
}

/// Install (or replace) the mapping in one transaction, under the same advisory lock and
/// lock timeout as `migrate`. With `print_only`, return the SQL and change nothing.
pub async fn install(
    conn: &mut PgConnection,
    mapping: Mapping,
    target: &TableName,
    print_only: bool,
) -> Result<String, AdoptError> {
    let mut tx = conn.begin().await?;
    for sql in [
        "SET LOCAL lock_timeout = '10s'",
        "SET LOCAL client_min_messages = warning",
    ] {
        sqlx::query(sql).execute(&mut *tx).await?;
    }
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(target.lock_key())
        .execute(&mut *tx)
        .await?;
    let cols = columns(&mut tx, &mapping.source).await?;
    let checked = mapping.check(&cols, target)?;
    let target_exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .bind(target.quoted())
        .fetch_one(&mut *tx)
        .await?;
    let mut sql = String::new();
    if !target_exists {
        sql.push_str(&target.ddl(true, crate::table::ReadMode::Claim));
        sql.push('\n');
    }
    sql.push_str(&checked.ddl(target));
    if print_only {
        tx.rollback().await?;
    } else {
        sqlx::raw_sql(AssertSqlSafe(sql.clone()))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
    }
    Ok(sql)
}

/// Remove the mapping trigger and function (idempotent), in one transaction.
pub async fn remove(conn: &mut PgConnection, source: &TableName) -> Result<(), sqlx::Error> {
    let mut tx = conn.begin().await?;
    sqlx::query("SET LOCAL lock_timeout = '10s'")
        .execute(&mut *tx)
        .await?;
    sqlx::raw_sql(AssertSqlSafe(remove_ddl(source)))
        .execute(&mut *tx)
        .await?;
    tx.commit().await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn debezium_columns() -> Vec<Column> {
        [
            ("id", "uuid"),
            ("aggregatetype", "varchar"),
            ("aggregateid", "varchar"),
            ("type", "varchar"),
            ("payload", "jsonb"),
        ]
        .iter()
        .map(|(n, t)| Column {
            column_name: n.to_string(),
            udt_name: t.to_string(),
            is_nullable: *n == "payload",
            column_default: None,
        })
        .collect()
    }

    fn mapping(source: &str) -> Mapping {
        Mapping {
            source: TableName::parse(source).unwrap(),
            id_column: "id".into(),
            key_column: "aggregateid".into(),
            payload_column: "payload".into(),
            topic: TopicTemplate::parse("outbox.event.${aggregatetype}").unwrap(),
            headers: vec![HeaderColumn::parse("type").unwrap()],
            key_format: Encoding::Json,
            payload_format: Encoding::Json,
            header_format: HeaderFormat::Json,
            header_schemas: true,
            tombstone_on_empty_payload: false,
        }
    }

    fn outbox() -> TableName {
        TableName::parse("outbox").unwrap()
    }

    fn refused(m: Mapping, columns: &[Column]) -> String {
        m.check(columns, &outbox()).unwrap_err().to_string()
    }

    #[test]
    fn topic_templates_parse_literals_and_placeholders() {
        let t = TopicTemplate::parse("outbox.event.${aggregatetype}").unwrap();
        assert_eq!(
            t.0,
            [
                Part::Literal("outbox.event.".into()),
                Part::Column("aggregatetype".into())
            ]
        );
        let t = TopicTemplate::parse("${a}-${b}").unwrap();
        assert_eq!(t.columns().collect::<Vec<_>>(), ["a", "b"]);
        for bad in ["", "a b", "x.$y", "x.${y", "x.${}", "o'x.${a}"] {
            assert!(TopicTemplate::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn header_columns_take_an_optional_name_and_refuse_reserved_ones() {
        assert_eq!(
            HeaderColumn::parse("type:eventType").unwrap(),
            HeaderColumn {
                column: "type".into(),
                header: "eventType".into()
            }
        );
        assert_eq!(HeaderColumn::parse("type").unwrap().header, "type");
        assert!(HeaderColumn::parse("x:outbox-event-id").is_err());
        assert!(HeaderColumn::parse("a$b").is_err());
        assert!(HeaderColumn::parse(":h").is_err());
    }

    #[test]
    fn check_names_the_missing_column_and_lists_the_table() {
        let mut m = mapping("orders_outbox");
        m.key_column = "aggregate_id".into();
        let err = refused(m, &debezium_columns());
        assert!(
            err.starts_with(
                "--key-column: table public.orders_outbox has no column \"aggregate_id\""
            ) && err.contains("aggregateid (varchar)")
                && err.contains("payload (jsonb)"),
            "{err}"
        );
        let err = refused(mapping("orders_outbox"), &[]);
        assert!(err.contains("no such table"), "{err}");
        let err = refused(mapping("outbox"), &debezium_columns());
        assert!(err.contains("the relay's own --table"), "{err}");
    }

    #[test]
    fn check_refuses_types_it_cannot_map() {
        let mut cols = debezium_columns();
        cols[4].udt_name = "bytea".into();
        let err = refused(mapping("o"), &cols);
        assert!(err.contains("--payload-format raw"), "{err}");
        let mut m = mapping("o");
        m.payload_format = Encoding::Raw;
        let ddl = m.check(&cols, &outbox()).unwrap().ddl(&outbox());
        assert!(ddl.contains("            NEW.\"payload\",\n"), "{ddl}");
        cols[2].udt_name = "_text".into();
        let err = refused(mapping("o"), &cols);
        assert!(
            err.contains("--key-column: column \"aggregateid\" has type _text"),
            "{err}"
        );
        let mut m = mapping("o");
        m.headers = vec![HeaderColumn::parse("type:id").unwrap()];
        let err = refused(m, &debezium_columns());
        assert!(err.contains("header \"id\" is given twice"), "{err}");
    }

    #[test]
    fn default_mapping_ddl() {
        let ddl = mapping("orders_outbox")
            .check(&debezium_columns(), &outbox())
            .unwrap()
            .ddl(&outbox());
        for part in [
            r#"CREATE OR REPLACE FUNCTION "public"."orders_outbox_outbox_relay"() RETURNS trigger"#,
            r#"INSERT INTO "public"."outbox" (topic, key, payload, headers)"#,
            r#"VALUES ('outbox.event.' || coalesce(NEW."aggregatetype"::text, '<null aggregatetype>'),"#,
            r#"coalesce("public"."orders_outbox_outbox_relay_json"(NEW."aggregateid"::text), 'null'),"#,
            r#"convert_to(coalesce("public"."orders_outbox_outbox_relay_json"(NEW."payload"::text), 'null'), 'UTF8'),"#,
            r#"'id', '{"schema":{"type":"string","optional":false,"name":"io.debezium.data.Uuid","version":1},"payload":' || coalesce("public"."orders_outbox_outbox_relay_json"(NEW."id"::text), 'null') || '}',"#,
            r#"'type', '{"schema":{"type":"string","optional":false},"payload":' || coalesce("public"."orders_outbox_outbox_relay_json"(NEW."type"::text), 'null') || '}')));"#,
            r#"CREATE OR REPLACE FUNCTION "public"."orders_outbox_outbox_relay_json"(s text) RETURNS text"#,
            r#"CREATE TRIGGER "outbox_relay_adopt" AFTER INSERT ON "public"."orders_outbox""#,
            "FOR EACH ROW EXECUTE FUNCTION",
            "SECURITY DEFINER SET search_path = pg_catalog, pg_temp",
        ] {
            assert!(ddl.contains(part), "missing {part:?} in:\n{ddl}");
        }
    }

    #[test]
    fn hostile_names_stay_inside_quotes() {
        let cols: Vec<Column> = [
            "i\"d",
            "k'; DROP TABLE users; --",
            "p",
            "t\"||pg_sleep(1)||\"",
        ]
        .iter()
        .map(|n| Column {
            column_name: n.to_string(),
            udt_name: "text".into(),
            is_nullable: true,
            column_default: None,
        })
        .collect();
        let m = Mapping {
            source: TableName::parse("s\"x.o'b").unwrap(),
            id_column: "i\"d".into(),
            key_column: "k'; DROP TABLE users; --".into(),
            payload_column: "p".into(),
            topic: TopicTemplate::parse("ev.${t\"||pg_sleep(1)||\"}").unwrap(),
            headers: vec![HeaderColumn::parse("p:h'x").unwrap()],
            key_format: Encoding::Raw,
            payload_format: Encoding::Raw,
            header_format: HeaderFormat::String,
            header_schemas: true,
            tombstone_on_empty_payload: false,
        };
        let ddl = m.clone().check(&cols, &outbox()).unwrap().ddl(&outbox());
        assert!(
            ddl.contains(r#"NEW."k'; DROP TABLE users; --"::text"#),
            "{ddl}"
        );
        assert!(ddl.contains(r#"NEW."t""||pg_sleep(1)||"""::text"#), "{ddl}");
        assert!(ddl.contains(r#"'<null t"||pg_sleep(1)||">'"#), "{ddl}");
        assert!(
            ddl.contains("'id', NEW.\"i\"\"d\"::text,\n                'h''x', NEW.\"p\"::text"),
            "{ddl}"
        );
        assert!(ddl.contains(r#"ON "s""x"."o'b""#), "{ddl}");
        assert!(
            ddl.contains(r#"tgrelid = '"s""x"."o''b"'::regclass"#),
            "{ddl}"
        );
        assert!(remove_ddl(&m.source)
            .contains(r#"DROP FUNCTION IF EXISTS "s""x"."o'b_outbox_relay"();"#));
        assert!(remove_ddl(&m.source)
            .contains(r#"DROP FUNCTION IF EXISTS "s""x"."o'b_outbox_relay_json"(text);"#));
        assert!(check_column("a$b").is_err() && check_column("").is_err());
    }

    fn column(udt: &str, nullable: bool, default: Option<&str>) -> Column {
        Column {
            column_name: "c".into(),
            udt_name: udt.into(),
            is_nullable: nullable,
            column_default: default.map(str::to_string),
        }
    }

    #[test]
    fn json_strings_are_escaped_as_jackson_writes_them() {
        assert_eq!(jackson_string("plain ö ✓"), r#""plain ö ✓""#);
        assert_eq!(jackson_string("🎉"), r#""\uD83C\uDF89""#);
        assert_eq!(
            jackson_string("a\"b\\c\n\t\r\u{8}\u{c}\u{1}\u{1f}\u{7f}\u{2028}"),
            "\"a\\\"b\\\\c\\n\\t\\r\\b\\f\\u0001\\u001F\u{7f}\u{2028}\""
        );
        assert_eq!(text_literal("a'b"), "'a''b'");
        assert_eq!(text_literal(r"\u0001'"), r"E'\\u0001'''");
    }

    #[test]
    fn defaults_are_derived_as_debezium_derives_them() {
        let d = |udt: &str, expr: &str| debezium_default(&column(udt, true, Some(expr)));
        let zero = Some("00000000-0000-0000-0000-000000000000".to_string());
        assert_eq!(d("uuid", "gen_random_uuid()"), zero);
        assert_eq!(d("uuid", "public.uuid_generate_v4()"), zero);
        assert_eq!(
            d("uuid", "'A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11'::uuid").as_deref(),
            Some("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11")
        );
        assert_eq!(
            d("int4", "nextval('t_id_seq'::regclass)").as_deref(),
            Some("0")
        );
        assert_eq!(d("int8", "42").as_deref(), Some("42"));
        assert_eq!(d("int4", "'-1'::integer").as_deref(), Some("-1"));
        assert_eq!(d("int2", "NULL::smallint"), None);
        assert_eq!(d("int2", "70000"), None, "unparsable: no default");
        assert_eq!(d("text", "now()").as_deref(), Some(""));
        assert_eq!(
            d("varchar", "'Event'::character varying").as_deref(),
            Some("Event")
        );
        assert_eq!(
            d("text", "'it''s'::text").as_deref(),
            Some("it"),
            "Debezium's quirk"
        );
        assert_eq!(
            d("text", "'a\nb'::text"),
            None,
            "Java's . stops at a line end"
        );
        assert_eq!(
            d("varchar", "CURRENT_USER").as_deref(),
            Some("CURRENT_USER")
        );
        assert_eq!(d("varchar", "NULL::character varying"), None);
        assert_eq!(d("jsonb", "'{}'::jsonb").as_deref(), Some("{}"));
        assert_eq!(d("bytea", r"'\x00'::bytea"), None);
        assert_eq!(debezium_default(&column("text", true, None)), None);
    }

    #[test]
    fn header_schemas_are_those_of_debeziums_postgres_connector() {
        assert_eq!(
            connect_schema(&column("uuid", false, Some("gen_random_uuid()"))),
            r#"{"type":"string","optional":false,"name":"io.debezium.data.Uuid","version":1,"default":"00000000-0000-0000-0000-000000000000"}"#
        );
        assert_eq!(
            connect_schema(&column(
                "varchar",
                true,
                Some("'🎉 new'::character varying")
            )),
            r#"{"type":"string","optional":true,"default":"\uD83C\uDF89 new"}"#
        );
        assert_eq!(
            connect_schema(&column("int4", true, Some("0"))),
            r#"{"type":"int32","optional":true,"default":0}"#
        );
        assert_eq!(
            connect_schema(&column("int8", false, None)),
            r#"{"type":"int64","optional":false}"#
        );
        assert_eq!(
            connect_schema(&column("int2", true, None)),
            r#"{"type":"int16","optional":true}"#
        );
    }

    #[test]
    fn header_formats_and_the_tombstone_option_change_the_ddl() {
        let mut cols = debezium_columns();
        cols[3].column_default = Some("'Event'::character varying".into());
        let ddl = |m: Mapping| m.check(&cols, &outbox()).unwrap().ddl(&outbox());

        let mut m = mapping("o");
        m.header_schemas = false;
        m.tombstone_on_empty_payload = true;
        let sql = ddl(m);
        assert!(
            sql.contains(r#"'type', coalesce("public"."o_outbox_relay_json"(coalesce(NEW."type"::text, 'Event')), 'null')"#),
            "{sql}"
        );
        assert!(
            sql.contains(r#"CASE WHEN NEW."payload"::text IS NULL OR NEW."payload"::text ~ E'^[\\x01-\\x20]*$' THEN NULL ELSE convert_to("#),
            "{sql}"
        );

        let mut m = mapping("o");
        m.header_format = HeaderFormat::String;
        m.key_format = Encoding::Raw;
        m.payload_format = Encoding::Raw;
        let sql = ddl(m);
        assert!(
            sql.contains(r#"'type', coalesce(NEW."type"::text, 'Event'))));"#),
            "{sql}"
        );
        assert!(
            sql.contains("            NEW.\"aggregateid\"::text,\n"),
            "{sql}"
        );
        assert!(
            sql.contains(r#"convert_to(NEW."payload"::text, 'UTF8'),"#),
            "{sql}"
        );
    }
}
