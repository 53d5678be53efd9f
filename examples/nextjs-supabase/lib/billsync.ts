// The app's one billsync client, for server code only: it holds the admin key.
import { Billsync } from "@billsync/client";

let client: Billsync | undefined;

export function billsync(): Billsync {
  client ??= new Billsync({
    baseUrl: setting("BILLSYNC_URL"),
    adminKey: setting("BILLSYNC_ADMIN_API_KEY"),
  });
  return client;
}

function setting(name: string): string {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set`);
  return value;
}
