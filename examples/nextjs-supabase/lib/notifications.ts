// The spec's `notifyUserOfCustomerDeletion`: the app tells the person their billing account
// is gone. Sending the email is the app's business; the example records who was told.
export const sentNotifications: { userId: string; kind: "customer_deleted" }[] = [];

export async function notifyUserOfCustomerDeletion(userId: string): Promise<void> {
  sentNotifications.push({ userId, kind: "customer_deleted" });
}
