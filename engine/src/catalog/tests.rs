use std::collections::BTreeSet;

use object_store::ObjectStoreExt as _;

use super::*;

fn store_in(dir: &std::path::Path) -> Store {
    Store::open(dir.to_str().unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writers_on_two_handles_lose_no_change() {
    let dir = tempfile::tempdir().unwrap();
    // Two handles on one folder stand for two servers; each runs eight writers at once.
    let a = store_in(dir.path());
    let b = store_in(dir.path());
    let mut tasks = Vec::new();
    for i in 0..16 {
        let store = if i % 2 == 0 { a.clone() } else { b.clone() };
        tasks.push(tokio::spawn(async move {
            let doc: Document<Vec<String>> =
                Document::new(&store, "things", None, &format!("node-{}", i % 2));
            doc.update(|v| {
                v.push(format!("item-{i}"));
                Ok(())
            })
            .await
            .unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let doc: Document<Vec<String>> = Document::new(&a, "things", None, "reader");
    let got: BTreeSet<String> = doc.read().await.unwrap().into_iter().collect();
    let want: BTreeSet<String> = (0..16).map(|i| format!("item-{i}")).collect();
    assert_eq!(got, want);
    // Sixteen versions were written; only the newest few are kept.
    let kept = doc.versions().await.unwrap();
    assert_eq!(kept.last(), Some(&16));
    assert!(kept.len() as u64 <= KEEP, "{kept:?}");
}

#[tokio::test]
async fn the_previous_format_is_read_and_left_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_in(dir.path());
    // What an earlier release wrote: a bare JSON array in `_quiver/<name>.json`.
    let legacy = br#"["from-the-old-file"]"#;
    store
        .object_store()
        .put(
            &store.path("_quiver/things.json").unwrap(),
            legacy.to_vec().into(),
        )
        .await
        .unwrap();
    let doc: Document<Vec<String>> =
        Document::new(&store, "things", Some("_quiver/things.json"), "n");
    assert_eq!(doc.read().await.unwrap(), vec!["from-the-old-file"]);
    let ((), now) = doc
        .update(|v| {
            v.push("new".into());
            Ok(())
        })
        .await
        .unwrap();
    assert_eq!(now, vec!["from-the-old-file", "new"]);
    assert_eq!(doc.read().await.unwrap(), now);
    let old = std::fs::read(dir.path().join("_quiver/things.json")).unwrap();
    assert_eq!(old, legacy);
    let written: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            dir.path()
                .join(format!("_quiver/catalog/things/{:020}.json", 1)),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(written["format"], FORMAT);
    assert_eq!(written["seq"], 1);
    assert_eq!(written["written_by"], "n");
}

#[tokio::test]
async fn a_newer_format_is_refused_and_a_failed_change_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_in(dir.path());
    let doc: Document<Vec<String>> = Document::new(&store, "things", None, "n");
    let err = doc
        .update(|_| Err::<(), _>(Error::AlreadyExists("no".into())))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::AlreadyExists(_)));
    assert!(doc.versions().await.unwrap().is_empty());
    // Nor does a change that leaves the value as it was.
    doc.update(|v| {
        v.push("x".into());
        Ok(())
    })
    .await
    .unwrap();
    doc.update(|v| {
        v.retain(|s| s != "y");
        Ok(())
    })
    .await
    .unwrap();
    assert_eq!(doc.versions().await.unwrap(), vec![1]);
    std::fs::remove_dir_all(dir.path().join("_quiver/catalog/things")).unwrap();

    let newer = serde_json::json!({"format": FORMAT + 1, "seq": 1, "written_by": "future",
        "written_at": "2030-01-01T00:00:00Z", "data": {"some": "shape"}});
    store
        .object_store()
        .put(
            &doc.version_path(1).unwrap(),
            serde_json::to_vec(&newer).unwrap().into(),
        )
        .await
        .unwrap();
    let err = doc.read().await.unwrap_err().to_string();
    assert!(err.contains("newer than this release"), "{err}");
}
