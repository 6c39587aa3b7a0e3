using System.Collections.Concurrent;
using System.Diagnostics.Metrics;
using System.Globalization;
using System.Net;
using System.Text;

namespace NbdServer.Common.Hosting;

/// <summary>
/// Listens to our meters (<c>NbdServer.*</c>, plus the runtime's <c>System.Runtime</c>) with a
/// <see cref="MeterListener"/> and renders them in the Prometheus text format (version 0.0.4).
/// Counters are summed, gauges keep their last value, histograms count into fixed buckets.
/// </summary>
public sealed class PrometheusExporter : IDisposable
{
    /// <summary>Latency buckets in seconds: 50 µs (a memory read) to 10 s (a degraded write times out at 3 s).</summary>
    private static readonly double[] Buckets = [0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10];

    private readonly MeterListener _listener = new();
    private readonly ConcurrentDictionary<Instrument, Metric> _metrics = new();
    private readonly Func<string, bool> _meterFilter;

    public PrometheusExporter(Func<string, bool>? meterFilter = null)
    {
        _meterFilter = meterFilter ?? (name => name.StartsWith("NbdServer.", StringComparison.Ordinal) || name == "System.Runtime");
        _listener.InstrumentPublished = (instrument, listener) =>
        {
            if (_meterFilter(instrument.Meter.Name))
            {
                var metric = new Metric(instrument);
                _metrics[instrument] = metric;
                listener.EnableMeasurementEvents(instrument, metric);
            }
        };
        _listener.MeasurementsCompleted = (instrument, _) => _metrics.TryRemove(instrument, out Metric? _);
        _listener.SetMeasurementEventCallback<byte>((i, v, tags, state) => ((Metric)state!).Record(v, tags));
        _listener.SetMeasurementEventCallback<short>((i, v, tags, state) => ((Metric)state!).Record(v, tags));
        _listener.SetMeasurementEventCallback<int>((i, v, tags, state) => ((Metric)state!).Record(v, tags));
        _listener.SetMeasurementEventCallback<long>((i, v, tags, state) => ((Metric)state!).Record(v, tags));
        _listener.SetMeasurementEventCallback<float>((i, v, tags, state) => ((Metric)state!).Record(v, tags));
        _listener.SetMeasurementEventCallback<double>((i, v, tags, state) => ((Metric)state!).Record(v, tags));
        _listener.SetMeasurementEventCallback<decimal>((i, v, tags, state) => ((Metric)state!).Record((double)v, tags));
        _listener.Start();
    }

    /// <summary>Polls the observable instruments and renders every series.</summary>
    public string Scrape()
    {
        foreach (Metric m in _metrics.Values)
        {
            m.BeginScrape();
        }
        _listener.RecordObservableInstruments();
        var text = new StringBuilder();
        foreach (Metric metric in _metrics.Values.OrderBy(m => m.Name, StringComparer.Ordinal))
        {
            metric.Render(text);
        }
        return text.ToString();
    }

    public void Dispose() => _listener.Dispose();

    /// <summary>"nbd.frontend.request.duration" with unit "s" → "nbd_frontend_request_duration_seconds".</summary>
    internal static string PrometheusName(string name, string? unit, bool counter)
    {
        var sb = new StringBuilder(name.Length + 16);
        foreach (char c in name)
        {
            sb.Append(char.IsAsciiLetterOrDigit(c) ? c : '_');
        }
        string suffix = unit switch
        {
            "s" => "_seconds",
            "By" => "_bytes",
            _ => "",
        };
        if (suffix.Length > 0 && !sb.ToString().EndsWith(suffix, StringComparison.Ordinal))
        {
            sb.Append(suffix);
        }
        if (counter)
        {
            sb.Append("_total");
        }
        return sb.ToString();
    }

    private static string Labels(ReadOnlySpan<KeyValuePair<string, object?>> tags, string? extra = null)
    {
        if (tags.Length == 0 && extra is null)
        {
            return "";
        }
        var pairs = new List<KeyValuePair<string, object?>>(tags.Length);
        foreach (KeyValuePair<string, object?> t in tags)
        {
            pairs.Add(t);
        }
        pairs.Sort((a, b) => string.CompareOrdinal(a.Key, b.Key));
        var sb = new StringBuilder("{");
        foreach (KeyValuePair<string, object?> t in pairs)
        {
            if (sb.Length > 1)
            {
                sb.Append(',');
            }
            foreach (char c in t.Key)
            {
                sb.Append(char.IsAsciiLetterOrDigit(c) ? c : '_');
            }
            sb.Append("=\"");
            string value = Convert.ToString(t.Value, CultureInfo.InvariantCulture) ?? "";
            sb.Append(value.Replace("\\", "\\\\", StringComparison.Ordinal).Replace("\"", "\\\"", StringComparison.Ordinal).Replace("\n", "\\n", StringComparison.Ordinal));
            sb.Append('"');
        }
        return sb.Append('}').ToString();
    }

    private static string Number(double value) => value switch
    {
        double.PositiveInfinity => "+Inf",
        double.NegativeInfinity => "-Inf",
        _ => value.ToString("R", CultureInfo.InvariantCulture),
    };

    private enum Kind
    {
        Sum,
        Last,
        Histogram,
    }

    private sealed class Metric
    {
        private readonly Instrument _instrument;
        private readonly Kind _kind;
        private readonly bool _observable;
        private readonly string _type;
        private readonly ConcurrentDictionary<string, Series> _series = new(StringComparer.Ordinal);

        // The hot path's common case, one string-valued tag (e.g. command=READ): looked up without building a label string.
        private readonly ConcurrentDictionary<(string, string), Series> _oneTag = new();

        public Metric(Instrument instrument)
        {
            _instrument = instrument;
            Type t = instrument.GetType().IsGenericType ? instrument.GetType().GetGenericTypeDefinition() : instrument.GetType();
            _observable = instrument.IsObservable;
            (_kind, _type, bool counter) = t.Name switch
            {
                "Counter`1" or "ObservableCounter`1" => (Kind.Sum, "counter", true),
                "Histogram`1" => (Kind.Histogram, "histogram", false),
                "UpDownCounter`1" => (Kind.Sum, "gauge", false),
                _ => (Kind.Last, "gauge", false),
            };
            Name = PrometheusName(instrument.Name, instrument.Unit, counter);
        }

        public string Name { get; }

        public void BeginScrape()
        {
            if (_observable)
            {
                // An observable reports its whole state on each poll: series it no longer reports are gone.
                _series.Clear();
                _oneTag.Clear();
            }
        }

        public void Record(double value, ReadOnlySpan<KeyValuePair<string, object?>> tags)
        {
            Series series;
            if (tags.Length == 1 && tags[0].Value is string s)
            {
                (string, string) key = (tags[0].Key, s);
                if (!_oneTag.TryGetValue(key, out series!))
                {
                    series = _series.GetOrAdd(Labels(tags), _ => new Series(_kind == Kind.Histogram));
                    _oneTag[key] = series;
                }
            }
            else
            {
                series = _series.GetOrAdd(Labels(tags), _ => new Series(_kind == Kind.Histogram));
            }
            series.Record(_kind, _observable, value);
        }

        public void Render(StringBuilder text)
        {
            if (_series.IsEmpty)
            {
                return;
            }
            CultureInfo c = CultureInfo.InvariantCulture;
            if (_instrument.Description is { Length: > 0 } help)
            {
                text.Append(c, $"# HELP {Name} {help.Replace("\\", "\\\\", StringComparison.Ordinal).Replace("\n", " ", StringComparison.Ordinal)}\n");
            }
            text.Append(c, $"# TYPE {Name} {_type}\n");
            foreach ((string labels, Series series) in _series.OrderBy(p => p.Key, StringComparer.Ordinal))
            {
                lock (series)
                {
                    if (_kind != Kind.Histogram)
                    {
                        text.Append(c, $"{Name}{labels} {Number(series.Value)}\n");
                        continue;
                    }
                    string inner = labels.Length == 0 ? "" : labels[1..^1] + ",";
                    long cumulative = 0;
                    for (int b = 0; b < Buckets.Length; b++)
                    {
                        cumulative += series.Buckets![b];
                        text.Append(c, $"{Name}_bucket{{{inner}le=\"{Number(Buckets[b])}\"}} {cumulative}\n");
                    }
                    text.Append(c, $"{Name}_bucket{{{inner}le=\"+Inf\"}} {series.Count}\n");
                    text.Append(c, $"{Name}_sum{labels} {Number(series.Value)}\n");
                    text.Append(c, $"{Name}_count{labels} {series.Count}\n");
                }
            }
        }
    }

    private sealed class Series(bool histogram)
    {
        public double Value;
        public long Count;
        public readonly long[]? Buckets = histogram ? new long[PrometheusExporter.Buckets.Length] : null;

        public void Record(Kind kind, bool observable, double value)
        {
            lock (this)
            {
                switch (kind)
                {
                    case Kind.Sum when !observable:
                        Value += value;
                        break;
                    case Kind.Histogram:
                        Value += value;
                        Count++;
                        int b = Array.BinarySearch(PrometheusExporter.Buckets, value);
                        b = b >= 0 ? b : ~b;
                        if (b < Buckets!.Length)
                        {
                            Buckets[b]++;
                        }
                        break;
                    default:
                        Value = value;
                        break;
                }
            }
        }
    }
}

/// <summary>
/// <c>--metrics ADDR:PORT</c>: answers <c>GET /metrics</c> with <see cref="PrometheusExporter.Scrape"/>,
/// and nothing else (other paths 404, other methods 405, a Host that isn't local 400).
/// Opt-in and meant for localhost (a Prometheus agent or node exporter textfile on the same host).
/// </summary>
public sealed class MetricsEndpoint(IPEndPoint endPoint, PrometheusExporter exporter, LocalHttpLimits? limits = null, Logging.LogThrottle? throttle = null) : IAsyncDisposable
{
    private readonly LocalHttpEndpoint _http = new(endPoint, request => request switch
    {
        { Method: "GET", Path: "/metrics" } => new LocalHttpResponse("200 OK", "text/plain; version=0.0.4; charset=utf-8", Encoding.UTF8.GetBytes(exporter.Scrape())),
        { Path: "/metrics" } => LocalHttpResponse.MethodNotAllowed("only GET /metrics"),
        _ => LocalHttpResponse.NotFound("try GET /metrics"),
    }, limits, throttle);

    public IPEndPoint LocalEndPoint => (IPEndPoint)_http.LocalEndPoint;

    public void Start() => _http.Start();

    public ValueTask DisposeAsync() => _http.DisposeAsync();
}
