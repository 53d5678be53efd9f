-- Tell every billsync instance when a link changes or goes away, so their link caches evict
-- it. A trigger catches every path: billsync's own writes, cascades from deleted users, and
-- an operator's manual SQL. Watermark updates do not fire it.
CREATE FUNCTION billsync_notify_link_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('billsync_link_changes', OLD.user_id);
    RETURN NULL;
END;
$$;

CREATE TRIGGER customer_links_changed
    AFTER UPDATE OF user_id, stripe_customer_id OR DELETE ON customer_links
    FOR EACH ROW EXECUTE FUNCTION billsync_notify_link_change();
