using System.Globalization;
using System.Text;

namespace NbdServer.Tests.Shared;

/// <summary>
/// A strict reader of the Prometheus text exposition format (version 0.0.4), for tests: what a
/// scraper would refuse, this throws <see cref="FormatException"/> for, naming the line. Checked:
/// metric and label name syntax, label value escapes, numbers (with +Inf, -Inf, NaN), at most one
/// HELP and one TYPE per family and both before its samples, a family's samples together, no
/// sample twice, a histogram's buckets sorted by <c>le</c>, cumulative, ending in +Inf equal to
/// <c>_count</c>, with a <c>_sum</c>.
/// </summary>
internal static class PrometheusText
{
    internal sealed record Sample(string Name, IReadOnlyDictionary<string, string> Labels, double Value)
    {
        /// <summary>The labels as one sorted key, without the ones named (e.g. "le" for a histogram's series).</summary>
        public string LabelKey(params string[] without) =>
            string.Join(",", Labels.Where(l => !without.Contains(l.Key)).OrderBy(l => l.Key, StringComparer.Ordinal).Select(l => $"{l.Key}={l.Value}"));
    }

    internal sealed class Family(string name)
    {
        public string Name { get; } = name;

        public string? Type { get; set; }

        public string? Help { get; set; }

        public List<Sample> Samples { get; } = [];
    }

    private static readonly string[] Types = ["counter", "gauge", "histogram", "summary", "untyped"];

    public static IReadOnlyDictionary<string, Family> Parse(string text)
    {
        var families = new Dictionary<string, Family>(StringComparer.Ordinal);
        var seen = new HashSet<string>(StringComparer.Ordinal);
        var closed = new HashSet<string>(StringComparer.Ordinal);
        Family? current = null;
        string[] lines = text.Split('\n');
        if (lines[^1].Length != 0)
        {
            throw new FormatException("the text does not end in a line feed");
        }
        for (int n = 0; n < lines.Length - 1; n++)
        {
            string line = lines[n];
            try
            {
                if (line.Length == 0)
                {
                    continue;
                }
                if (line.StartsWith('#'))
                {
                    string[] parts = line.Split(' ', 4);
                    if (parts.Length >= 3 && parts[0] == "#" && parts[1] is "HELP" or "TYPE")
                    {
                        string name = MetricName(parts[2]);
                        Family family = Enter(name);
                        if (family.Samples.Count > 0)
                        {
                            throw new FormatException($"{parts[1]} after the family's samples");
                        }
                        if (parts[1] == "TYPE")
                        {
                            if (family.Type is not null || parts.Length != 4 || !Types.Contains(parts[3]))
                            {
                                throw new FormatException("a second TYPE, or an unknown type");
                            }
                            family.Type = parts[3];
                        }
                        else
                        {
                            if (family.Help is not null)
                            {
                                throw new FormatException("a second HELP");
                            }
                            family.Help = parts.Length == 4 ? parts[3] : "";
                        }
                    }
                    continue;
                }
                Sample sample = ParseSample(line);
                Family owner = Enter(FamilyOf(sample.Name, families));
                if (!seen.Add($"{sample.Name}{{{sample.LabelKey()}}}"))
                {
                    throw new FormatException("the same sample twice");
                }
                owner.Samples.Add(sample);
            }
            catch (FormatException e)
            {
                throw new FormatException($"line {n + 1} '{line}': {e.Message}", e);
            }
            catch (IndexOutOfRangeException e)
            {
                throw new FormatException($"line {n + 1} '{line}': ends inside its labels", e);
            }
        }
        foreach (Family family in families.Values.Where(f => f.Type == "histogram"))
        {
            CheckHistogram(family);
        }
        return families;

        Family Enter(string name)
        {
            if (current?.Name == name)
            {
                return current;
            }
            if (current is not null)
            {
                closed.Add(current.Name);
            }
            if (closed.Contains(name))
            {
                throw new FormatException($"family {name} is split in two");
            }
            current = new Family(name);
            families.Add(name, current);
            return current;
        }
    }

    /// <summary>The family a sample belongs to: a histogram's <c>_bucket</c>, <c>_sum</c> and <c>_count</c> belong to their base name.</summary>
    private static string FamilyOf(string name, Dictionary<string, Family> families)
    {
        foreach (string suffix in new[] { "_bucket", "_sum", "_count" })
        {
            if (name.EndsWith(suffix, StringComparison.Ordinal) && families.TryGetValue(name[..^suffix.Length], out Family? f) && f.Type is "histogram" or "summary")
            {
                return f.Name;
            }
        }
        return name;
    }

    private static Sample ParseSample(string line)
    {
        int i = 0;
        while (i < line.Length && line[i] is not ('{' or ' '))
        {
            i++;
        }
        string name = MetricName(line[..i]);
        var labels = new Dictionary<string, string>(StringComparer.Ordinal);
        if (i < line.Length && line[i] == '{')
        {
            i++;
            while (line[i] != '}')
            {
                int eq = line.IndexOf('=', i);
                if (eq < 0)
                {
                    throw new FormatException("a label without '='");
                }
                string label = LabelName(line[i..eq]);
                i = eq + 1;
                if (line[i] != '"')
                {
                    throw new FormatException("a label value without quotes");
                }
                i++;
                var value = new StringBuilder();
                while (line[i] != '"')
                {
                    if (line[i] == '\\')
                    {
                        i++;
                        value.Append(line[i] switch
                        {
                            '\\' => '\\',
                            '"' => '"',
                            'n' => '\n',
                            _ => throw new FormatException($"escape '\\{line[i]}' in a label value"),
                        });
                    }
                    else
                    {
                        value.Append(line[i]);
                    }
                    i++;
                }
                i++;
                if (!labels.TryAdd(label, value.ToString()))
                {
                    throw new FormatException($"label {label} twice");
                }
                if (line[i] == ',')
                {
                    i++;
                }
                else if (line[i] != '}')
                {
                    throw new FormatException("labels not separated by ','");
                }
            }
            i++;
        }
        if (i >= line.Length || line[i] != ' ')
        {
            throw new FormatException("no space before the value");
        }
        string[] rest = line[(i + 1)..].Split(' ');
        if (rest.Length is < 1 or > 2 || (rest.Length == 2 && !long.TryParse(rest[1], NumberStyles.AllowLeadingSign, CultureInfo.InvariantCulture, out _)))
        {
            throw new FormatException("a value and at most a timestamp");
        }
        return new Sample(name, labels, Number(rest[0]));
    }

    internal static double Number(string text) => text switch
    {
        "+Inf" => double.PositiveInfinity,
        "-Inf" => double.NegativeInfinity,
        "NaN" => double.NaN,
        _ when double.TryParse(text, NumberStyles.Float, CultureInfo.InvariantCulture, out double v) => v,
        _ => throw new FormatException($"'{text}' is not a number"),
    };

    private static string MetricName(string name) =>
        name.Length > 0 && (char.IsAsciiLetter(name[0]) || name[0] is '_' or ':') && name.All(c => char.IsAsciiLetterOrDigit(c) || c is '_' or ':')
            ? name
            : throw new FormatException($"'{name}' is not a metric name");

    private static string LabelName(string name) =>
        name.Length > 0 && (char.IsAsciiLetter(name[0]) || name[0] == '_') && name.All(c => char.IsAsciiLetterOrDigit(c) || c == '_')
            ? name
            : throw new FormatException($"'{name}' is not a label name");

    private static void CheckHistogram(Family family)
    {
        foreach (IGrouping<string, Sample> series in family.Samples.GroupBy(s => s.LabelKey("le")))
        {
            var buckets = series.Where(s => s.Name == family.Name + "_bucket").ToList();
            Sample? count = series.SingleOrDefault(s => s.Name == family.Name + "_count");
            if (count is null || !series.Any(s => s.Name == family.Name + "_sum") || buckets.Count == 0)
            {
                throw new FormatException($"histogram {family.Name}{{{series.Key}}} lacks _bucket, _sum or _count");
            }
            double[] le = [.. buckets.Select(b => b.Labels.TryGetValue("le", out string? v) ? Number(v) : throw new FormatException($"a bucket of {family.Name} without le"))];
            if (!double.IsPositiveInfinity(le[^1]) || le.Zip(le.Skip(1)).Any(p => p.First >= p.Second))
            {
                throw new FormatException($"histogram {family.Name}{{{series.Key}}}: le not increasing to +Inf");
            }
            if (buckets.Zip(buckets.Skip(1)).Any(p => p.First.Value > p.Second.Value) || buckets[^1].Value != count.Value)
            {
                throw new FormatException($"histogram {family.Name}{{{series.Key}}}: buckets not cumulative, or +Inf is not _count");
            }
        }
    }
}
