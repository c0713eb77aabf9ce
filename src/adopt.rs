//! Adoption of an existing outbox table (Debezium's layout by default), unchanged.
//!
//! `outbox-relay adopt` installs on the existing table an `AFTER INSERT ... FOR EACH ROW`
//! trigger whose function maps the new row into the relay's own outbox table in the same
//! transaction: topic from a template over columns, key, payload and headers from columns.
//! The application's table and code stay as they are; the relay reads its own table as
//! always. The mapping is checked against `information_schema` before anything is changed.

use sqlx::{AssertSqlSafe, Connection, PgConnection};

use crate::table::{quote_ident, quote_literal, TableName};

/// Name of the trigger on the adopted table (trigger names are per table).
pub const TRIGGER: &str = "outbox_relay_adopt";
/// Comment prefix on the trigger function, so `doctor` can find adoptions feeding a table.
pub const COMMENT_PREFIX: &str = "outbox-relay adopt: ";

/// How a key or payload column is encoded into bytes, matching a Kafka Connect converter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Encoding {
    /// The column's text (Kafka Connect `StringConverter`).
    Raw,
    /// The column as a JSON value: strings quoted and escaped, integers bare (Kafka Connect
    /// `JsonConverter` with `schemas.enable=false`; the router documentation's example).
    Json,
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
}

/// A mapping checked against the table's real columns: what the trigger function needs.
#[derive(Debug, Clone)]
pub struct Checked {
    mapping: Mapping,
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
            payload_is_bytea,
        })
    }
}

/// `NEW."column"`: a column of the inserted row.
fn new_col(column: &str) -> String {
    format!("NEW.{}", quote_ident(column))
}

fn encode(column: &str, encoding: Encoding) -> String {
    match encoding {
        Encoding::Raw => format!("{}::text", new_col(column)),
        Encoding::Json => format!("to_jsonb({})::text", new_col(column)),
    }
}

impl Checked {
    /// The function name: derived from the adopted table, in its schema.
    fn function(&self) -> String {
        function_name(&self.mapping.source)
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
                    "coalesce({}::text, {})",
                    new_col(c),
                    quote_literal(&format!("<null {c}>"))
                ),
            })
            .collect::<Vec<_>>()
            .join(" || ")
    }

    fn payload_sql(&self) -> String {
        let m = &self.mapping;
        if self.payload_is_bytea {
            return new_col(&m.payload_column);
        }
        let text = format!("{}::text", new_col(&m.payload_column));
        match m.payload_format {
            Encoding::Raw => format!("convert_to({text}, 'UTF8')"),
            Encoding::Json => format!("convert_to(to_jsonb({text})::text, 'UTF8')"),
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
            .map(|(header, column)| format!("{}, {}::text", quote_literal(header), new_col(column)))
            .collect();
        // Debezium sends a NULL column as a header with no value; a row header must be a
        // string, so a NULL column's header is left out instead.
        format!(
            "jsonb_strip_nulls(jsonb_build_object({}))",
            pairs.join(", ")
        )
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
            topic = self.topic_sql(),
            key = encode(&m.key_column, m.key_format),
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

/// The DDL that removes the mapping trigger and its function. Idempotent.
pub fn remove_ddl(source: &TableName) -> String {
    format!(
        "-- outbox-relay adopt --remove: stop copying rows of {source}.\nDROP TRIGGER IF EXISTS {} ON {};\nDROP FUNCTION IF EXISTS {}();\n",
        quote_ident(TRIGGER),
        source.quoted(),
        function_name(source)
    )
}

/// The adopted table's columns, in table order (none when the table does not exist).
pub async fn columns(
    conn: &mut PgConnection,
    source: &TableName,
) -> Result<Vec<Column>, sqlx::Error> {
    sqlx::query_as(
        "SELECT column_name::text, udt_name::text FROM information_schema.columns \
         WHERE table_schema = $1 AND table_name = $2 ORDER BY ordinal_position",
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
            r#"to_jsonb(NEW."aggregateid")::text,"#,
            r#"convert_to(to_jsonb(NEW."payload"::text)::text, 'UTF8'),"#,
            r#"jsonb_strip_nulls(jsonb_build_object('id', NEW."id"::text, 'type', NEW."type"::text)));"#,
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
        };
        let ddl = m.clone().check(&cols, &outbox()).unwrap().ddl(&outbox());
        assert!(
            ddl.contains(r#"NEW."k'; DROP TABLE users; --"::text"#),
            "{ddl}"
        );
        assert!(ddl.contains(r#"NEW."t""||pg_sleep(1)||"""::text"#), "{ddl}");
        assert!(ddl.contains(r#"'<null t"||pg_sleep(1)||">'"#), "{ddl}");
        assert!(
            ddl.contains(r#"'id', NEW."i""d"::text, 'h''x', NEW."p"::text"#),
            "{ddl}"
        );
        assert!(ddl.contains(r#"ON "s""x"."o'b""#), "{ddl}");
        assert!(
            ddl.contains(r#"tgrelid = '"s""x"."o''b"'::regclass"#),
            "{ddl}"
        );
        assert!(remove_ddl(&m.source)
            .contains(r#"DROP FUNCTION IF EXISTS "s""x"."o'b_outbox_relay"();"#));
        assert!(check_column("a$b").is_err() && check_column("").is_err());
    }
}
