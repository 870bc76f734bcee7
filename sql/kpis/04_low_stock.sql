CREATE MATERIALIZED VIEW low_stock AS
SELECT sku, warehouse_id, on_hand FROM stock_on_hand WHERE on_hand < 20;
