// The app's own tables that billsync's events keep current: the spec's `users` (the profile
// the app shows) and `subscriptions` (the plan it enforces). In the real app these are Supabase
// tables written with the service-role client; here they are kept in memory so the example
// runs anywhere.
export interface AppUser {
  id: string;
  email: string;
  first_name: string | null;
  last_name: string | null;
  phone: string | null;
}

export interface AppPlan {
  plan: string | null;
  features: string[];
  limits: Record<string, number>;
  /** The Stripe customer, null once it was deleted in Stripe. */
  stripe_customer_id: string | null;
}

type Nullable<T> = { [K in keyof T]?: T[K] | null };

export const appDb = {
  users: new Map<string, AppUser>(),
  /** Keeps the app's copy of a user as billsync answered or announced them. */
  saveUser(user: Pick<AppUser, "id" | "email"> & Nullable<Omit<AppUser, "id" | "email">>): void {
    const { id, email, first_name = null, last_name = null, phone = null } = user;
    this.users.set(id, { id, email, first_name, last_name, phone });
  },
  plans: new Map<string, AppPlan>(),
  /** The app's view of a user's plan: what it holds, or nothing known yet. */
  planOf(userId: string): AppPlan {
    return this.plans.get(userId) ?? { plan: null, features: [], limits: {}, stripe_customer_id: null };
  },
  /** Writes these fields of a user's plan row, keeping the others. */
  updatePlan(userId: string, fields: Partial<AppPlan>): void {
    this.plans.set(userId, { ...this.planOf(userId), ...fields });
  },
  /** App events already handled: deliveries are at least once. */
  handledEvents: new Set<string>(),
  /** People who deleted their account: an event about them still in flight changes nothing. */
  erased: new Set<string>(),
  forget(userId: string): void {
    this.erased.add(userId);
    this.users.delete(userId);
    this.plans.delete(userId);
  },
};
