use arrow::array::{AsArray, Decimal128Array};
use arrow::datatypes::{Decimal128Type, Int64Type, TimestampMicrosecondType};
use arrow::ipc::writer::StreamWriter;

use super::*;
use crate::RowError;

const GOOD: &str = r#"{"event_id":"e1","event_time":"2026-11-25T10:00:00Z","order_id":"o1","customer_id":"c1","warehouse_id":"W1","sku":"S1","quantity":2,"unit_price":19.99,"status":"paid","channel":"web"}"#;

fn orders() -> StreamSchema {
    StreamSchema::orders()
}

fn invalid(r: Result<RecordBatch>) -> Vec<RowError> {
    match r {
        Err(Error::Invalid { errors, total }) => {
            assert_eq!(errors.len(), total);
            errors
        }
        other => panic!("expected Invalid, got {other:?}"),
    }
}

#[test]
fn ndjson_good_rows_decode_with_exact_types() {
    let body = format!(
        "{GOOD}\n\n{}\n",
        GOOD.replace("e1", "e2")
            .replace("2026-11-25T10:00:00Z", "1767323045123")
    );
    let b = decode(&orders(), Format::Ndjson, body.as_bytes()).unwrap();
    assert_eq!(b.num_rows(), 2);
    let price: &Decimal128Array = b
        .column_by_name("unit_price")
        .unwrap()
        .as_primitive::<Decimal128Type>();
    assert_eq!(price.value(0), 1999);
    let t = b
        .column_by_name("event_time")
        .unwrap()
        .as_primitive::<TimestampMicrosecondType>();
    assert_eq!(t.value(1), 1_767_323_045_123_000);
    assert_eq!(
        b.column_by_name("quantity")
            .unwrap()
            .as_primitive::<Int64Type>()
            .value(0),
        2
    );
}

#[test]
fn json_array_and_missing_optional() {
    let no_channel = GOOD.replace(r#","channel":"web""#, "");
    let body = format!("[{GOOD}, {no_channel}]");
    let b = decode(&orders(), Format::Json, body.as_bytes()).unwrap();
    assert_eq!(b.num_rows(), 2);
    assert!(b.column_by_name("channel").unwrap().is_null(1));
}

#[test]
fn every_bad_row_is_listed_with_row_and_column() {
    let lines = [
        GOOD.to_owned(),
        "{not json".to_owned(),
        GOOD.replace(r#""quantity":2"#, r#""quantity":-1"#),
        GOOD.replace(r#""status":"paid""#, r#""status":"lost""#),
        GOOD.replace(r#""sku":"S1","#, ""),
        GOOD.replace(r#""channel":"web""#, r#""channel":"web","colour":"red""#),
        GOOD.replace(r#""quantity":2"#, r#""quantity":"two""#),
        GOOD.replace("2026-11-25T10:00:00Z", "25/11/2026"),
        GOOD.replace(r#""event_id":"e1""#, r#""event_id":"""#),
        GOOD.replace("19.99", "-1.00"),
        "[1,2]".to_owned(),
    ];
    let errors = invalid(decode(
        &orders(),
        Format::Ndjson,
        lines.join("\n").as_bytes(),
    ));
    let at = |row: usize| errors.iter().filter(|e| e.row == row).collect::<Vec<_>>();
    assert!(at(1).is_empty());
    assert!(at(2)[0].reason.contains("malformed JSON"));
    assert_eq!(at(3)[0].column.as_deref(), Some("quantity"));
    assert!(at(3)[0].reason.contains("> 0"));
    assert!(at(4)[0].reason.contains("not one of"));
    assert_eq!(at(5)[0].column.as_deref(), Some("sku"));
    assert!(at(5)[0].reason.contains("missing"));
    assert_eq!(at(6)[0].column.as_deref(), Some("colour"));
    assert!(at(6)[0].reason.contains("unknown"));
    assert!(at(7)[0].reason.contains("expected integer"));
    assert!(at(8)[0].reason.contains("RFC 3339"));
    assert!(at(9)[0].reason.contains("empty"));
    assert_eq!(at(10)[0].column.as_deref(), Some("unit_price"));
    assert!(at(11)[0].reason.contains("object"));
    assert_eq!(errors.len(), 10);
}

#[test]
fn empty_bodies_are_refused() {
    assert!(matches!(
        decode(&orders(), Format::Ndjson, b"\n \n"),
        Err(Error::Empty)
    ));
    assert!(matches!(
        decode(&orders(), Format::Json, b"[]"),
        Err(Error::Empty)
    ));
    assert!(matches!(
        decode(&orders(), Format::Json, b"{\"a\":1}"),
        Err(Error::Malformed { .. })
    ));
    assert!(matches!(
        decode(&orders(), Format::Csv, b""),
        Err(Error::Empty) | Err(Error::Invalid { .. })
    ));
}

#[test]
fn csv_with_header() {
    let body = "event_id,event_time,order_id,customer_id,warehouse_id,sku,quantity,unit_price,status\n\
                e1,2026-11-25T10:00:00Z,o1,c1,W1,S1,3,5.5,paid\n\
                e2,1767323045123,o1,c1,W1,S2,1,0,created\n";
    let b = decode(&orders(), Format::Csv, body.as_bytes()).unwrap();
    assert_eq!(b.num_rows(), 2);
    assert_eq!(
        b.column_by_name("unit_price")
            .unwrap()
            .as_primitive::<Decimal128Type>()
            .value(0),
        550
    );
    assert!(b.column_by_name("channel").unwrap().is_null(0));

    let bad = "event_id,event_time,order_id,customer_id,warehouse_id,sku,quantity,unit_price,status\n\
               e1,2026-11-25T10:00:00Z,o1,c1,W1,S1,x,5.5,paid\n\
               e2,2026-11-25T10:00:00Z,o1,c1,W1\n";
    let errors = invalid(decode(&orders(), Format::Csv, bad.as_bytes()));
    assert_eq!(errors[0].row, 1);
    assert_eq!(errors[0].column.as_deref(), Some("quantity"));
    assert_eq!(errors[1].row, 2);
    assert!(errors[1].reason.contains("fields"));

    let header = "event_id,event_time,order_id,customer_id,warehouse_id,sku,quantity,unit_price,status,extra\n";
    let errors = invalid(decode(&orders(), Format::Csv, header.as_bytes()));
    assert_eq!(errors[0].row, 0);
    assert_eq!(errors[0].column.as_deref(), Some("extra"));
}

fn ipc(batch: &RecordBatch) -> Vec<u8> {
    let mut buf = Vec::new();
    let mut w = StreamWriter::try_new(&mut buf, &batch.schema()).unwrap();
    w.write(batch).unwrap();
    w.finish().unwrap();
    drop(w);
    buf
}

#[test]
fn arrow_ipc_round_trip_and_coercion() {
    let b = decode(&orders(), Format::Ndjson, GOOD.as_bytes()).unwrap();
    let back = decode(&orders(), Format::ArrowIpc, &ipc(&b)).unwrap();
    assert_eq!(b, back);

    // Producers may send narrower types and millisecond times; they are widened.
    use arrow::array::{Int32Array, StringArray, TimestampMillisecondArray};
    use arrow::datatypes::{Field, Schema, TimeUnit};
    let schema = Arc::new(Schema::new(vec![
        Field::new("event_id", DataType::Utf8, false),
        Field::new(
            "event_time",
            DataType::Timestamp(TimeUnit::Millisecond, None),
            false,
        ),
        Field::new("sku", DataType::Utf8, false),
        Field::new("warehouse_id", DataType::Utf8, false),
        Field::new("kind", DataType::Utf8, false),
        Field::new("quantity", DataType::Int32, false),
    ]));
    let batch = RecordBatch::try_new(
        schema,
        vec![
            Arc::new(StringArray::from(vec!["a", "b"])),
            Arc::new(TimestampMillisecondArray::from(vec![1_000, 2_000])),
            Arc::new(StringArray::from(vec!["S", "S"])),
            Arc::new(StringArray::from(vec!["W", "W"])),
            Arc::new(StringArray::from(vec!["receipt", "teleport"])),
            Arc::new(Int32Array::from(vec![5, 0])),
        ],
    )
    .unwrap();
    let errors = invalid(decode(
        &StreamSchema::inventory(),
        Format::ArrowIpc,
        &ipc(&batch),
    ));
    assert_eq!(errors.len(), 2);
    assert!(errors.iter().all(|e| e.row == 2));
}

#[test]
fn arrow_garbage_is_malformed() {
    assert!(matches!(
        decode(&orders(), Format::ArrowIpc, b"definitely not arrow"),
        Err(Error::Malformed { .. })
    ));
}

#[test]
fn content_types() {
    assert_eq!(
        Format::from_content_type("application/x-ndjson"),
        Some(Format::Ndjson)
    );
    assert_eq!(
        Format::from_content_type("application/json; charset=utf-8"),
        Some(Format::Json)
    );
    assert_eq!(Format::from_content_type("TEXT/CSV"), Some(Format::Csv));
    assert_eq!(Format::from_content_type("text/plain"), None);
}
