using Microsoft.Extensions.Time.Testing;
using NbdServer.Frontend.Qos;

namespace NbdServer.Frontend.Tests;

/// <summary>The QoS token bucket and an export's limiter, on a fake clock: rates, burst, borrowing, live changes.</summary>
public sealed class TokenBucketTests
{
    private readonly FakeTimeProvider _time = new();

    private long Now => _time.GetTimestamp();

    private double Milliseconds(long ticks) => ticks * 1000.0 / _time.TimestampFrequency;

    private TokenBucket Bucket(double rate, double burst)
    {
        var bucket = new TokenBucket(_time.TimestampFrequency);
        bucket.Configure(rate, burst, Now);
        return bucket;
    }

    [Test]
    public void A_full_bucket_lets_the_burst_go_at_once_then_paces_at_the_rate()
    {
        TokenBucket bucket = Bucket(rate: 100, burst: 10);

        double[] waits = [.. Enumerable.Range(0, 13).Select(_ => Milliseconds(bucket.Reserve(1, Now)))];

        Assert.That(waits, Is.EqualTo(new double[] { 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 10, 20, 30 }).Within(0.001));
    }

    [Test]
    public void Idle_time_refills_the_bucket_only_up_to_the_burst()
    {
        TokenBucket bucket = Bucket(rate: 100, burst: 10);
        for (int i = 0; i < 10; i++)
        {
            bucket.Reserve(1, Now);
        }

        _time.Advance(TimeSpan.FromSeconds(60));

        Assert.That(bucket.Level(Now), Is.EqualTo(10).Within(1e-9));
        Assert.That(Enumerable.Range(0, 11).Count(_ => bucket.Reserve(1, Now) == 0), Is.EqualTo(10));
    }

    [Test]
    public void Over_a_second_the_bucket_grants_the_burst_plus_the_rate()
    {
        TokenBucket bucket = Bucket(rate: 250, burst: 25);
        int granted = 0;
        long end = Now + _time.TimestampFrequency;
        // A client that sends the next request as soon as the last one may go.
        for (long due = Now; due <= end; granted++)
        {
            due = Math.Max(due, Now + bucket.Reserve(1, Now));
            if (due > Now)
            {
                _time.Advance(TimeSpan.FromTicks((due - Now) * TimeSpan.TicksPerSecond / _time.TimestampFrequency));
            }
        }

        Assert.That(granted - 1, Is.EqualTo(250 + 25).Within(1));
    }

    [Test]
    public void A_request_larger_than_the_burst_goes_when_the_bucket_is_full_and_the_next_pays_its_debt()
    {
        TokenBucket bucket = Bucket(rate: 100, burst: 10);

        long big = bucket.Reserve(50, Now);
        long next = bucket.Reserve(1, Now);

        Assert.That(big, Is.Zero, "a 50-token request must not wait for a 10-token bucket to hold 50");
        Assert.That(bucket.Level(Now), Is.EqualTo(-41).Within(1e-9));
        Assert.That(Milliseconds(next), Is.EqualTo(410).Within(0.001), "the next request waits until the 40 borrowed are repaid and its own token is in");
    }

    [Test]
    public void A_request_larger_than_the_burst_waits_only_until_the_bucket_is_full()
    {
        TokenBucket bucket = Bucket(rate: 100, burst: 10);
        bucket.Reserve(5, Now);

        Assert.That(Milliseconds(bucket.Reserve(50, Now)), Is.EqualTo(50).Within(0.001));
    }

    [Test]
    public void A_rate_change_keeps_the_debt_and_repays_it_at_the_new_rate()
    {
        TokenBucket bucket = Bucket(rate: 100, burst: 10);
        bucket.Reserve(50, Now);
        _time.Advance(TimeSpan.FromMilliseconds(100));

        bucket.Configure(200, 20, Now);

        Assert.That(bucket.Level(Now), Is.EqualTo(-30).Within(1e-9), "10 ms of the old rate repaid 10 of the 40 borrowed; the rest is still owed");
        Assert.That(Milliseconds(bucket.Reserve(1, Now)), Is.EqualTo(155).Within(0.001), "31 tokens at 200/s");
    }

    [Test]
    public void A_lower_burst_caps_the_saved_tokens_at_once()
    {
        TokenBucket bucket = Bucket(rate: 100, burst: 100);

        bucket.Configure(100, 5, Now);

        Assert.That(Enumerable.Range(0, 6).Count(_ => bucket.Reserve(1, Now) == 0), Is.EqualTo(5));
    }

    [Test]
    public void Rate_zero_is_no_limit_and_a_new_limit_starts_with_a_full_bucket()
    {
        TokenBucket bucket = Bucket(rate: 10, burst: 1);
        bucket.Reserve(100, Now);

        bucket.Configure(0, 0, Now);
        bool free = Enumerable.Range(0, 1000).All(_ => bucket.Reserve(1 << 20, Now) == 0);
        bucket.Configure(10, 3, Now);

        Assert.That(free, Is.True);
        Assert.That(bucket.Level(Now), Is.EqualTo(3).Within(1e-9));
    }

    [Test]
    public void A_refund_gives_back_a_reservation_but_never_more_than_the_burst()
    {
        TokenBucket bucket = Bucket(rate: 100, burst: 10);
        bucket.Reserve(4, Now);

        bucket.Refund(4, Now);
        bucket.Refund(4, Now);

        Assert.That(bucket.Level(Now), Is.EqualTo(10).Within(1e-9));
    }

    [Test]
    public void Limiter_counts_reads_and_writes_in_their_own_buckets_and_both_in_the_total()
    {
        var limiter = new QosLimiter(new QosLimits { ReadIops = 10, WriteIops = 100, TotalIops = 15, Burst = TimeSpan.FromSeconds(1) }, _time);

        int reads = Enumerable.Range(0, 20).Count(_ => limiter.TryGoNow(QosDirection.Read, 4096));
        int writes = Enumerable.Range(0, 20).Count(_ => limiter.TryGoNow(QosDirection.Write, 4096));

        Assert.That((reads, writes), Is.EqualTo((10, 5)), "10 reads fill the read bucket; the total of 15 leaves 5 writes");
    }

    [Test]
    public void Limiter_bandwidth_limit_counts_bytes_and_a_zero_byte_trim_counts_only_as_an_operation()
    {
        var limiter = new QosLimiter(new QosLimits { WriteMbps = 1, Burst = TimeSpan.FromSeconds(1) }, _time);

        long first = limiter.Reserve(QosDirection.Write, 1 << 20, out _);
        long trim = limiter.Reserve(QosDirection.Write, 0, out _);
        long second = limiter.Reserve(QosDirection.Write, 512 << 10, out _);

        Assert.That((first, trim), Is.EqualTo((0L, 0L)));
        Assert.That(Milliseconds(second), Is.EqualTo(500).Within(0.01), "the first MiB emptied the bucket: half a MiB more waits half a second");
    }

    [Test]
    public void Limiter_change_gives_back_the_waiting_reservation_and_reserves_again_under_the_new_limits()
    {
        var limiter = new QosLimiter(new QosLimits { ReadIops = 1, Burst = TimeSpan.FromSeconds(1) }, _time);
        limiter.Reserve(QosDirection.Read, 0, out _);
        long wait = limiter.Reserve(QosDirection.Read, 0, out long version);

        limiter.Set(new QosLimits { ReadIops = 4, Burst = TimeSpan.FromSeconds(1) });
        long after = limiter.Rereserve(QosDirection.Read, 0, ref version);

        Assert.That(Milliseconds(wait), Is.EqualTo(1000).Within(0.01));
        Assert.That(Milliseconds(after), Is.EqualTo(250).Within(0.01), "the first read's token is still owed, now repaid at 4/s");
        Assert.That(limiter.Changed(version), Is.False);
    }

    [Test]
    public void Limiter_with_no_limit_is_inactive_and_lets_everything_go()
    {
        var limiter = new QosLimiter(time: _time);

        Assert.That(limiter.Active, Is.False);
        Assert.That(Enumerable.Range(0, 1000).All(_ => limiter.TryGoNow(QosDirection.Write, 32 << 20)), Is.True);
    }
}
